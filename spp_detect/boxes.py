"""The one box convention of spp-detect.

Every box inside the code is a float ``(x1, y1, x2, y2)`` in **0-based continuous image
pixels** of the original image (torchvision's and detectron2's ``XYXY_ABS``): pixel ``i``
covers ``[i, i + 1)``, so a box covering the whole ``W x H`` image is ``(0, 0, W, H)``, and
width is ``x2 - x1`` with no ``+ 1``. Arrays of boxes are ``Tensor[N, 4]`` (float32) or,
at file boundaries, ``np.ndarray[N, 4]`` (float32).

Conversions happen once, at I/O boundaries:

* VOC annotations (1-based, inclusive ``xmin..xmax``) -> :func:`from_voc_1based` in
  ``spp_detect.datasets.voc``;
* COCO annotations (continuous 0-based ``[x, y, w, h]``) -> ``(x, y, x + w, y + h)`` in
  ``spp_detect.datasets.coco`` (results json written back as ``[x, y, w, h]``);
* MATLAB selective-search files (1-based ``(y1, x1, y2, x2)``) -> ``proposals.io``;
* the VOC devkit's result files and its ``+ 1`` IoU rule live only in ``eval/``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_area as _tv_box_area
from torchvision.ops import box_iou as _tv_box_iou
from torchvision.ops import clip_boxes_to_image as _tv_clip

__all__ = [
    "from_voc_1based",
    "to_voc_1based",
    "clip_boxes",
    "mirror_boxes",
    "box_area",
    "box_iou",
    "remove_small_boxes",
]


def from_voc_1based(boxes: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Convert VOC's 1-based inclusive pixel boxes to the 0-based continuous convention.

    A VOC box ``xmin..xmax`` (1-based, both ends inclusive) covers 0-based pixels
    ``xmin - 1 .. xmax - 1``, i.e. the continuous interval ``[xmin - 1, xmax)``; so only
    the left/top coordinates move (as detectron2's VOC loader does).

    Args:
        boxes: ``[N, 4]`` 1-based inclusive ``(xmin, ymin, xmax, ymax)``.

    Returns:
        ``[N, 4]`` 0-based ``(x1, y1, x2, y2)``, same type as the input; floating input
        keeps its dtype (``eval`` works in float64), integer input becomes float32.
    """
    out = _float_copy(boxes)
    _check_shape(out)
    out[:, 0] -= 1
    out[:, 1] -= 1
    return out


def to_voc_1based(boxes: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Inverse of :func:`from_voc_1based`: 0-based continuous ``[N, 4]`` -> 1-based inclusive
    (dtype rule as there)."""
    out = _float_copy(boxes)
    _check_shape(out)
    out[:, 0] += 1
    out[:, 1] += 1
    return out


def clip_boxes(boxes: Tensor, width: int, height: int) -> Tensor:
    """Clip ``Tensor[N, 4]`` 0-based xyxy boxes to an image of ``width x height`` pixels.

    The result lies in ``[0, width] x [0, height]`` (continuous coordinates).
    """
    _check_shape(boxes)
    return _tv_clip(boxes, (height, width))


def mirror_boxes(boxes: Tensor, width: int) -> Tensor:
    """The ``Tensor[N, 4]`` 0-based xyxy boxes of an image of ``width`` pixels, mirrored
    left-right: ``(x1, y1, x2, y2) -> (width - x2, y1, width - x1, y2)``.

    A box covering pixel columns ``[x1, x2)`` covers ``[width - x2, width - x1)`` in the
    mirrored image; this is the release's ``x' = W + 1 - x`` on 1-based inclusive
    coordinates (``imdb_from_voc.m``, docs/sources.md 1.6). Mirroring twice gives the boxes back.
    """
    _check_shape(boxes)
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def box_area(boxes: Tensor) -> Tensor:
    """Areas ``Tensor[N]`` of ``Tensor[N, 4]`` 0-based xyxy boxes (``(x2 - x1) * (y2 - y1)``)."""
    _check_shape(boxes)
    return _tv_box_area(boxes)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU ``Tensor[N, M]`` of 0-based xyxy boxes ``Tensor[N, 4]`` and ``Tensor[M, 4]``.

    Continuous areas (no ``+ 1``); the VOC devkit's ``+ 1`` rule is in ``eval.voc`` only.
    """
    _check_shape(boxes1)
    _check_shape(boxes2)
    return _tv_box_iou(boxes1, boxes2)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices ``Tensor[K]`` (int64) of the ``Tensor[N, 4]`` boxes whose width and height are
    both at least ``min_size`` pixels, in their original order."""
    _check_shape(boxes)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return torch.nonzero((widths >= min_size) & (heights >= min_size)).flatten()


def _float_copy(boxes: np.ndarray | Tensor) -> np.ndarray | Tensor:
    if isinstance(boxes, Tensor):
        return boxes.clone() if boxes.is_floating_point() else boxes.to(torch.float32)
    array = np.asarray(boxes)
    return array.astype(array.dtype if np.issubdtype(array.dtype, np.floating) else np.float32, copy=True)


def _check_shape(boxes: np.ndarray | Tensor) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
