"""Bounding-box regression targets: encode a window's offset to its ground truth, and back.

R-CNN / SPP-net parametrisation (R-CNN appendix C; ``spp_train_bbox_regressor.m``,
docs/sources.md 1.9): with centres ``(x, y)`` and sizes ``(w, h)`` of a window ``P`` and its ground
truth ``G``::

    dx = (Gx - Px) / Pw    dy = (Gy - Py) / Ph    dw = log(Gw / Pw)    dh = log(Gh / Ph)

Boxes are 0-based continuous xyxy (:mod:`spp_detect.boxes`): ``w = x2 - x1`` and the
centre is ``x1 + w / 2``. (The release works on 1-based inclusive corners with
``w = x2 - x1 + eps``, one pixel short of the true width; in the continuous convention
the width is exact and no ``eps`` is needed for boxes of positive size.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["encode_boxes", "decode_boxes"]


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode_boxes(windows: Tensor, targets: Tensor) -> Tensor:
    """Regression targets ``Tensor[N, 4]`` ``(dx, dy, dw, dh)`` that move ``windows``
    (``Tensor[N, 4]``, 0-based xyxy, positive size) onto ``targets`` (``Tensor[N, 4]``).

    Example: window ``(0, 0, 10, 10)``, target ``(5, 0, 15, 20)`` gives
    ``(0.5, 0.5, 0, log 2)``.
    """
    px, py, pw, ph = _centre_size(windows)
    gx, gy, gw, gh = _centre_size(targets)
    return torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1)


def decode_boxes(windows: Tensor, deltas: Tensor) -> Tensor:
    """Inverse of :func:`encode_boxes`: boxes ``Tensor[N, 4]`` (0-based xyxy) that
    ``deltas`` (``Tensor[N, 4]``) predict from ``windows`` (``Tensor[N, 4]``)."""
    if len(windows) == 0:
        return windows.new_zeros((0, 4))
    px, py, pw, ph = _centre_size(windows)
    x = px + deltas[:, 0] * pw
    y = py + deltas[:, 1] * ph
    w = pw * torch.exp(deltas[:, 2])
    h = ph * torch.exp(deltas[:, 3])
    return torch.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], dim=1)
