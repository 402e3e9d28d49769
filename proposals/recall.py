"""Recall of ground truth by proposals: the standard measure of a proposal method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from spp_detect.boxes import box_iou
from spp_detect.datasets.voc import VOCImage

__all__ = ["TOP_K", "IOU_THRESHOLDS", "SMALL_OBJECT_SIZE", "proposal_recall"]

#: Box budgets reported by convention (R-CNN / SPP-net use about 2,000 per image).
TOP_K: tuple[int, ...] = (100, 300, 1000, 2000)
#: IoU thresholds: 0.5 is VOC's detection criterion, 0.7 a tighter localisation check.
IOU_THRESHOLDS: tuple[float, ...] = (0.5, 0.7)
#: Objects narrower or shorter than this (pixels) are reported apart: R-CNN's minimum box
#: side (``selective_search_boxes.m``), below which its fixed rule keeps no box.
SMALL_OBJECT_SIZE: float = 20


def proposal_recall(
    images: Sequence[VOCImage],
    proposals: Mapping[str, np.ndarray],
    top_k: Sequence[int] = TOP_K,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
    small_size: float = SMALL_OBJECT_SIZE,
) -> dict[str, object]:
    """Fraction of non-difficult ground-truth boxes covered by one of the first ``k`` boxes.

    Args:
        images: VOC images (boxes 0-based xyxy; difficult objects are not counted).
        proposals: image id -> ``np.ndarray[N, 4]`` float32 0-based xyxy, best ranked first.
        top_k: box budgets per image.
        thresholds: an object counts as covered when some box has continuous IoU >= t.
        small_size: objects whose width or height is below this many pixels are also
            counted apart, in ``"small"``.

    Returns:
        ``{"num_objects": int, "recall": {"iou>=0.5": {"100": r, ...}, ...},
        "small": {"num_objects": int, "recall": {...}}}`` (``"small"``: the objects under
        ``small_size`` px alone; recall 0 where there are none).
    """
    hits = {t: {k: 0 for k in top_k} for t in thresholds}
    small_hits = {t: {k: 0 for k in top_k} for t in thresholds}
    num_objects = num_small = 0
    for image in images:
        gt = torch.tensor(image.boxes[~image.difficult], dtype=torch.float32)  # [G, 4]
        boxes = torch.as_tensor(proposals[image.image_id], dtype=torch.float32)  # [N, 4]
        num_objects += len(gt)
        if len(gt) == 0:
            continue
        small = torch.minimum(gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]) < small_size  # [G]
        num_small += int(small.sum())
        iou = box_iou(gt, boxes) if len(boxes) else torch.zeros((len(gt), 0))  # [G, N]
        for k in top_k:
            best = iou[:, :k].amax(dim=1) if iou.shape[1] else torch.zeros(len(gt))  # [G]
            for t in thresholds:
                hits[t][k] += int((best >= t).sum())
                small_hits[t][k] += int(((best >= t) & small).sum())

    def rates(counts: dict, total: int) -> dict:
        return {f"iou>={t}": {str(k): counts[t][k] / max(total, 1) for k in top_k} for t in thresholds}

    return {"num_objects": num_objects, "recall": rates(hits, num_objects),
            "small": {"num_objects": num_small, "size": small_size, "recall": rates(small_hits, num_small)}}
