"""Evaluation: VOC devkit AP (``eval.voc``), COCO metrics (``eval.coco``), result files
(``eval.results``) and precision-recall plots (``eval.plots``).

Only this package knows the VOC devkit's 1-based pixel frame and its ``+ 1`` IoU rule;
everything it is given and returns uses 0-based continuous xyxy boxes
(:mod:`spp_detect.boxes`). ``eval.coco`` and ``eval.plots`` import pycocotools and
matplotlib when called, so importing this package stays light.
"""

from eval.results import (
    ClassDetections,
    Detections,
    DetectionsError,
    read_coco_results,
    read_detections,
    read_voc_results,
    write_coco_results,
    write_voc_results,
)
from eval.voc import RULES, ClassAP, VOCEvaluation, evaluate_voc, voc_ap, voc_eval

__all__ = [
    "RULES",
    "ClassAP",
    "ClassDetections",
    "Detections",
    "DetectionsError",
    "VOCEvaluation",
    "evaluate_voc",
    "read_coco_results",
    "read_detections",
    "read_voc_results",
    "voc_ap",
    "voc_eval",
    "write_coco_results",
    "write_voc_results",
]

# Image classification AP (VOCevalcls.m).
from eval.voc_cls import ClsEvaluation, evaluate_voc_cls, read_cls_results, voc_cls_ap, write_cls_results  # noqa: E402

__all__ += ["ClsEvaluation", "evaluate_voc_cls", "read_cls_results", "voc_cls_ap", "write_cls_results"]
