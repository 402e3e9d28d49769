"""COCO metrics of VOC detections: a thin wrapper around pycocotools' ``COCOeval``.

The VOC ground truth is converted to a COCO dataset dict:

* ``images``: ``id`` = the VOC image id string, ``file_name``, ``width``, ``height``;
* ``categories``: ``id = 1 + index`` in the class list, ``name``;
* ``annotations``: ``bbox = [x1, y1, x2 - x1, y2 - y1]`` from the 0-based xyxy boxes (COCO
  boxes are xywh, continuous, with no ``+ 1``; pycocotools' IoU has no ``+ 1`` either),
  ``area = w * h``, and ``iscrowd = 1`` for VOC's difficult objects. pycocotools
  overwrites an annotation's ``ignore`` with ``iscrowd`` (cocoeval.py ``_prepare``), so
  ``iscrowd`` is its only ignore-region mechanism: a detection matched to a difficult
  object is neither a true nor a false positive, as in the devkit, but the match uses
  COCO's crowd IoU (intersection over the detection's area).

:func:`evaluate_coco_json` scores detections against a COCO dataset json as it is on disk
(``evaluate --coco --coco-json``): the project's image ids (file name stems) and class names
are mapped to the json's image and category ids, and its annotations are scored as they
are in the file (boxes the readers clipped for training are not clipped here; ``iscrowd``
and ``area`` are filled in where a labelling tool left them out).

Everything else is pycocotools' default ``bbox`` protocol: IoU 0.50:0.05:0.95, 101 recall
points, ``maxDets`` 1/10/100 per image and category, small/medium/large area ranges, and
its own greedy matching (best still-unmatched box; docs/sources.md 3.3).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from eval.results import ClassDetections, DetectionsError, detections_to_coco
from spp_detect.datasets.voc import VOC_CLASSES, VOCImage

__all__ = ["COCO_STAT_NAMES", "COCOEvaluation", "voc_to_coco", "evaluate_coco", "evaluate_coco_json"]

#: Names of the 12 numbers of ``COCOeval.summarize()``, in its order.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass(frozen=True)
class COCOEvaluation:
    """Result of :func:`evaluate_coco`.

    Attributes:
        stats: the 12 ``COCOeval.stats``, by :data:`COCO_STAT_NAMES` (-1: undefined).
        ap: class name -> AP at IoU 0.50:0.95 (area all, 100 detections); NaN without ground truth.
        ap50: class name -> AP at IoU 0.50.
        curves: class name -> ``(recall [101], precision [101])`` at IoU 0.50 (for plots).
        summary: pycocotools' printed summary (the standard 12 lines).
    """

    stats: dict[str, float]
    ap: dict[str, float]
    ap50: dict[str, float]
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    summary: str

    def to_json(self) -> dict:
        """JSON-ready summary; ``"map"`` is COCO's AP (IoU 0.50:0.95); NaN -> ``None``."""

        def clean(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return {
            "stats": {k: float(v) for k, v in self.stats.items()},
            "map": float(self.stats["AP"]),
            "ap": {k: clean(v) for k, v in self.ap.items()},
            "ap50": {k: clean(v) for k, v in self.ap50.items()},
            "implementation": "pycocotools COCOeval (bbox), VOC difficult objects as iscrowd",
        }


def voc_to_coco(images: Sequence[VOCImage], classes: Sequence[str] = VOC_CLASSES) -> dict:
    """VOC ground truth -> a COCO dataset dict (see the module docstring for the mapping).

    Args:
        images: from :func:`spp_detect.datasets.voc.read_voc`; boxes 0-based xyxy.
        classes: class names in label order.

    Returns:
        ``{"images", "annotations", "categories"}``; annotation ids start at 1
        (pycocotools treats id 0 as "unmatched").
    """
    coco_images, annotations = [], []
    for image in images:
        coco_images.append(
            {"id": image.image_id, "file_name": image.path.name, "width": image.width, "height": image.height}
        )
        xywh = np.asarray(image.boxes, dtype=np.float64).reshape(-1, 4).copy()
        xywh[:, 2:] -= xywh[:, :2]
        for box, label, difficult in zip(xywh.tolist(), image.labels.tolist(), image.difficult.tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image.image_id,
                    "category_id": int(label) + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(difficult),
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "none"} for i, name in enumerate(classes)]
    return {"images": coco_images, "annotations": annotations, "categories": categories}


def evaluate_coco(
    detections: Mapping[str, ClassDetections],
    images: Sequence[VOCImage],
    classes: Sequence[str] = VOC_CLASSES,
) -> COCOEvaluation:
    """Score detections with pycocotools against the VOC ground truth converted to COCO.

    Args:
        detections: class name -> :class:`ClassDetections` (0-based xyxy boxes).
        images: the image set with its ground truth.
        classes: class names in label order.

    Returns:
        :class:`COCOEvaluation` (pycocotools' own printing is captured into ``summary``).

    Raises:
        DetectionsError: unknown class names or image ids in ``detections``.
    """
    from pycocotools.coco import COCO

    results = detections_to_coco(detections, classes)
    _check_image_ids(results, {image.image_id for image in images})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = voc_to_coco(images, classes)
        coco_gt.createIndex()
    return _evaluate(coco_gt, results, classes, list(range(1, len(classes) + 1)))


def evaluate_coco_json(
    detections: Mapping[str, ClassDetections], gt_json: Path | str, image_ids: Sequence[str] | None = None
) -> COCOEvaluation:
    """Score detections with pycocotools against a COCO dataset json, read as it is.

    Args:
        detections: class name -> :class:`ClassDetections` (0-based xyxy boxes); image ids
            are the file name stems of the json's images (what the stages name them),
            class names its category names.
        gt_json: the COCO dataset file (``images``, ``annotations``, ``categories``).
        image_ids: score only these images (file stems, e.g. the first N of ``--limit
            N``): pycocotools' ``params.imgIds``, so that neither their ground truth nor
            their detections count elsewhere; ``None``: every image of the json.

    Returns:
        :class:`COCOEvaluation` over the json's categories (in id order) and images.

    Raises:
        DetectionsError: class names or image ids the json does not have.
    """
    from pycocotools.coco import COCO

    dataset = json.loads(Path(gt_json).read_text())
    for ann in dataset.get("annotations", []):  # fields labelling tools leave out, that COCOeval reads
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
    categories = sorted(coco_gt.dataset["categories"], key=lambda c: c["id"])
    classes = [c["name"] for c in categories]
    coco_ids = {PurePosixPath(im["file_name"]).stem: im["id"] for im in coco_gt.dataset["images"]}
    results = detections_to_coco(detections, classes)  # category_id = 1 + index: mapped below
    _check_image_ids(results, set(coco_ids))
    for entry in results:
        entry["image_id"] = coco_ids[entry["image_id"]]
        entry["category_id"] = categories[entry["category_id"] - 1]["id"]
    if image_ids is not None:
        _check_image_ids([{"image_id": i} for i in image_ids], set(coco_ids))
        image_ids = sorted(coco_ids[i] for i in image_ids)
    return _evaluate(coco_gt, results, classes, [c["id"] for c in categories], image_ids)


def _check_image_ids(results: list[dict], known: set[str]) -> None:
    unknown = sorted({r["image_id"] for r in results} - known)
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise DetectionsError(f"{len(unknown)} detection image id(s) not in the image set: {shown}")


def _evaluate(coco_gt, results: list[dict], classes: Sequence[str], category_ids: Sequence[int],
              image_ids: Sequence[int] | None = None) -> COCOEvaluation:
    """pycocotools' ``COCOeval`` (bbox) of COCO ``results`` against ``coco_gt``; per-class
    numbers for ``classes``, whose category ids are ``category_ids``; only the images
    ``image_ids`` (``params.imgIds``) when given."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes cannot take an empty list (it reads anns[0])
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                               "categories": list(coco_gt.dataset["categories"])}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = list(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()

    # precision: [T IoUs, R recall points, K categories, A area ranges, M maxDets]; -1 = no GT.
    precision = coco_eval.eval["precision"]
    cat_ids = coco_eval.params.catIds
    ap, ap50, curves = {}, {}, {}
    for name, category_id in zip(classes, category_ids):
        k = cat_ids.index(category_id)
        p_all = precision[:, :, k, 0, -1]  # [T, R], area "all", maxDets 100
        ap[name] = float(p_all[p_all > -1].mean()) if (p_all > -1).any() else float("nan")
        p50 = p_all[0]
        ap50[name] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else float("nan")
        curves[name] = (np.asarray(coco_eval.params.recThrs, dtype=np.float64), np.clip(p50, 0, None))
    stats = {name: float(v) for name, v in zip(COCO_STAT_NAMES, coco_eval.stats)}
    return COCOEvaluation(stats, ap, ap50, curves, summary.getvalue())
