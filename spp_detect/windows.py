"""Image windows -> conv-map cells, and the per-window choice of scale (SPP-net 4.1, App. A).

Frames: ``boxes`` are 0-based continuous xyxy in **original image pixels** (see
:mod:`spp_detect.boxes`); a scale ``s`` resizes the image by ``f = s / min(W, H)`` so its
shorter side is ``s``; ``cells`` are **inclusive** integer ranges ``(x0, y0, x1, y1)`` of
0-based conv-map cells, the input of :func:`spp_detect.spp.spatial_pyramid_pool`.

The window rule (SPP-net TPAMI, Appendix A, "Mapping a Window to Feature Maps"): the
left/top edge maps to ``x' = floor(x / S) + 1`` and the right/bottom edge to
``x' = ceil(x / S) - 1``, ``S`` the total stride, for a net that pads ``floor(p/2)``.
Measured in units of ``S`` from the centre of cell 0, these are exactly the cells whose
receptive-field centres lie strictly inside the window. We apply the rule in that frame:
``u = (x - c0) / S`` with ``c0 = offset + 0.5`` the continuous coordinate of cell 0's
receptive-field centre (``offset`` from the backbone, 0 for ``floor(p/2)`` padding; pixel
``i``'s centre is ``i + 0.5``), so the backbone's offset generalises the paper's formula.

How the released code differs (docs/sources.md 1.3-1.4), and what we do:

* it maps a window with ``floor((x - 21 + 6.5) / 16 + 0.5)`` / ``ceil((x - 21 - 6.5) / 16 - 0.5)``
  (ZF-5 constants for its padding); we use the paper's rule with each trunk's offset;
* a collapsed window (left > right) takes ``(left + right) // 2`` there; here it takes the
  cell whose centre is nearest the window's centre;
* its scale choice makes the window side closest to 208 px (13 cells x 16), linear in
  scale; we follow the paper's text (area closest to 224 x 224), as Fast R-CNN's
  ``_project_im_rois`` does;
* it uses scale 874 where the paper says 864; our default is the paper's 864
  (``--scales`` takes any list).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["PAPER_SCALES", "TARGET_AREA", "scale_factors", "choose_scales", "windows_to_cells"]

#: Shorter-side scales of SPP-net's 5-scale detection (paper 4.1; the code used 874 for 864).
PAPER_SCALES: tuple[int, ...] = (480, 576, 688, 864, 1200)
#: A window is pooled at the scale that makes its area closest to 224 x 224 (paper 4.1).
TARGET_AREA: float = 224.0 * 224.0


def scale_factors(width: int, height: int, scales: Sequence[int]) -> Tensor:
    """Resize factors ``Tensor[S]`` (float64) that bring the shorter image side to each scale.

    Example: a 500 x 375 image at scale 688 is resized by 688 / 375 = 1.8347 to 917 x 688.
    """
    return torch.tensor([s / min(width, height) for s in scales], dtype=torch.float64)


def choose_scales(boxes: Tensor, factors: Tensor, target_area: float = TARGET_AREA) -> Tensor:
    """Index of the scale at which each window's area is closest to ``target_area``.

    Args:
        boxes: ``Tensor[N, 4]`` 0-based xyxy in original image pixels.
        factors: ``Tensor[S]`` resize factors (:func:`scale_factors`).
        target_area: pixels of the ideal scaled window (224 x 224, paper 4.1).

    Returns:
        ``Tensor[N]`` int64 in ``[0, S)``; ties go to the first (smaller) scale.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).to(torch.float64)  # [N]
    factors = factors.to(device=boxes.device, dtype=torch.float64)
    scaled = area[:, None] * factors[None, :] ** 2  # [N, S]
    return (scaled - target_area).abs().argmin(dim=1)  # argmin returns the first minimum


def windows_to_cells(
    boxes: Tensor,
    factors: Tensor,
    stride: int,
    offset: float,
    map_sizes: Tensor,
) -> Tensor:
    """Map image windows to inclusive conv-cell ranges on the map of their scale.

    Args:
        boxes: ``Tensor[N, 4]`` 0-based xyxy in original image pixels.
        factors: ``Tensor[N]`` each window's resize factor (original -> scaled pixels).
        stride: total stride ``S`` of the trunk (16 for ZF-5 conv5).
        offset: pixel index of the receptive-field centre of cell 0 in the scaled image
            (0 for ``floor(p/2)`` padding; :class:`spp_detect.backbones.BackboneSpec`).
        map_sizes: ``Tensor[N, 2]`` int ``(H, W)`` of the conv map each window is pooled on.

    Returns:
        ``Tensor[N, 4]`` int64 ``(x0, y0, x1, y1)``, inclusive, with ``0 <= x0 <= x1 < W``
        and ``0 <= y0 <= y1 < H``.

    Example: ``S = 16``, offset 0, factor 1, window ``(0, 0, 224, 224)`` on a 14 x 14 map:
    cell centres sit at 0.5 + 16 j, all 14 inside, so the cells are ``(0, 0, 13, 13)``.
    """
    if boxes.numel() == 0:
        return torch.zeros((0, 4), dtype=torch.int64, device=boxes.device)
    scaled = boxes.to(torch.float64) * factors.to(device=boxes.device, dtype=torch.float64)[:, None]  # [N, 4]
    u = (scaled - (offset + 0.5)) / stride  # window edges in cell-centre units
    lo = torch.floor(u[:, :2]) + 1  # paper: left/top  = floor(x / S) + 1
    hi = torch.ceil(u[:, 2:]) - 1  # paper: right/bottom = ceil(x / S) - 1
    centre = torch.floor((u[:, :2] + u[:, 2:]) / 2 + 0.5)  # nearest cell to the window centre
    collapsed = lo > hi  # [N, 2], per axis
    lo = torch.where(collapsed, centre, lo)
    hi = torch.where(collapsed, centre, hi)
    limit = torch.stack([map_sizes[:, 1], map_sizes[:, 0]], dim=1).to(device=boxes.device, dtype=torch.float64) - 1
    lo = torch.minimum(lo.clamp(min=0), limit)
    hi = torch.minimum(hi.clamp(min=0), limit)
    return torch.cat([lo, hi], dim=1).to(torch.int64)
