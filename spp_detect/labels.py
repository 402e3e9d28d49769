"""Training labels of windows: their overlap with the ground truth of each class.

Boxes are 0-based continuous xyxy in image pixels (:mod:`spp_detect.boxes`); IoU is the
continuous one of :func:`spp_detect.boxes.box_iou` (no ``+ 1``; the devkit's rule lives
in ``eval/`` only). The thresholds that turn overlaps into labels belong to each learner
(fine-tuning, SVMs, box regression) and are defined, with their sources, there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spp_detect.boxes import box_iou

__all__ = ["class_overlaps"]


def class_overlaps(boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int) -> Tensor:
    """Each window's best IoU with a ground-truth box of each class.

    Args:
        boxes: ``Tensor[N, 4]`` windows, 0-based xyxy.
        gt_boxes: ``Tensor[G, 4]`` ground-truth boxes, 0-based xyxy.
        gt_labels: ``Tensor[G]`` int64 class indices in ``[0, num_classes)``.
        num_classes: number of object classes (20 for VOC).

    Returns:
        ``Tensor[N, num_classes]`` float32: ``0`` where the image has no box of the class
        (so IoU-based rules never pick such a class). A ground-truth window has ``1`` at its
        own class.

    Example: one ground truth ``(0, 0, 10, 10)`` of class 2 and a window ``(0, 0, 10, 5)``
    give ``0.5`` in column 2 and ``0`` elsewhere.
    """
    out = torch.zeros((len(boxes), num_classes), dtype=torch.float32)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return out
    iou = box_iou(boxes.float(), gt_boxes.float())  # [N, G]
    index = gt_labels.to(torch.int64).expand(len(boxes), -1)  # [N, G]
    return out.scatter_reduce(1, index, iou, reduce="amax", include_self=True)
