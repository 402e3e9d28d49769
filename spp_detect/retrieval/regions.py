"""R-MAC's square regions on a conv map (Tolias et al., ICLR 2016, section 3; the released
``rmac_regionvec_act.m``, docs/sources.md 5.1).

Frame: regions live in **map cells** as integer, 0-based, half-open rectangles
``(x1, y1, x2, y2)``: the region covers cells ``x1 <= x < x2`` and ``y1 <= y < y2``. The
pixel boxes drawn for people are made from them by :func:`cells_to_pixels`.

The rule, for a ``H x W`` map and ``L`` levels:

* ``w = min(W, H)``; for the long side choose ``idx`` in ``steps = 2..7`` minimising
  ``|(w^2 - w b) / w^2 - overlap|`` with ``b = (max(W, H) - w) / (steps - 1)``; the long
  side then gets ``l + idx`` regions at level ``l`` (``idx`` 1-based, as the release's
  ``Wd``/``Hd``), the short side ``l``;
* level ``l`` has square regions of side ``wl = floor(2 w / (l + 1))``; with
  ``wl2 = floor(wl / 2 - 1)`` and ``b = (side - wl) / (n - 1)`` (0 when ``n = 1``), the
  offsets along a side with ``n`` regions are ``floor(wl2 + k b) - wl2``, ``k = 0..n-1``.

Level 1 is therefore not the whole map when ``W != H`` (it is two or more squares). A
30 x 40 map gives 20 regions (docs/sources.md 5.1's worked vectors; ``tests/test_retrieval_regions.py``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["OVERLAP", "LEVELS", "rmac_regions", "cells_to_pixels"]

#: Desired overlap of neighbouring regions (``ovr = 0.4``, rmac_regionvec_act.m; paper section 3).
OVERLAP: float = 0.4
#: Levels of the region pyramid (``L = 3``, test.m; paper section 3).
LEVELS: int = 3
#: Candidate region counts along the long side (``steps = [2 3 4 5 6 7]``, rmac_regionvec_act.m).
_STEPS = np.arange(2, 8)


def _offsets(side: int, wl: int, wl2: int, count: int) -> np.ndarray:
    b = (side - wl) / (count - 1) if count > 1 else 0.0  # MATLAB's 0/0 = NaN -> 0 at level 1
    return np.floor(wl2 + np.arange(count) * b).astype(np.int64) - wl2


def rmac_regions(height: int, width: int, levels: int = LEVELS, overlap: float = OVERLAP) -> np.ndarray:
    """The R-MAC regions of a ``height x width`` map.

    Args:
        height, width: map size in cells (both >= 1).
        levels: pyramid levels ``L``.
        overlap: desired overlap of neighbouring regions.

    Returns:
        ``np.ndarray[R, 4]`` int64 half-open cell rectangles ``(x1, y1, x2, y2)``, level by
        level, row-major within a level (rows outer, as the release's loops). Regions of
        side 0 are skipped. E.g. 30 x 40 gives 20 regions, 32 x 32 gives 14.
    """
    if height < 1 or width < 1:
        raise ValueError(f"rmac_regions: expected a map of at least 1 x 1 cells, got {height} x {width}")
    w = min(height, width)
    b = (max(height, width) - w) / (_STEPS - 1)
    idx = int(np.argmin(np.abs((w * w - w * b) / (w * w) - overlap))) + 1  # 1-based, as the release
    extra_w = idx if height < width else 0
    extra_h = idx if height > width else 0
    out = []
    for level in range(1, levels + 1):  # a handful of levels; each level is vectorised
        wl = math.floor(2 * w / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        xs = _offsets(width, wl, wl2, level + extra_w)
        ys = _offsets(height, wl, wl2, level + extra_h)
        y_grid, x_grid = np.meshgrid(ys, xs, indexing="ij")  # rows outer
        x1, y1 = x_grid.ravel(), y_grid.ravel()
        out.append(np.stack([x1, y1, x1 + wl, y1 + wl], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 4), dtype=np.int64)


def cells_to_pixels(
    cells: np.ndarray, stride: float, offset: float, width: int, height: int
) -> np.ndarray:
    """Half-open cell rectangles to 0-based float xyxy image boxes.

    Cell ``j``'s receptive field is centred at pixel ``offset + stride * j``
    (:class:`spp_detect.backbones.BackboneSpec`); a run of cells ``[x1, x2)`` becomes the
    pixels from half a stride before the first centre to half a stride after the last,
    clipped to the image. E.g. stride 16, offset 0: cells ``[2, 5)`` (centres 32, 48, 64) -> pixels 24 .. 72.

    Args:
        cells: ``np.ndarray[N, 4]`` half-open ``(x1, y1, x2, y2)`` in map cells.
        stride, offset: the backbone's geometry.
        width, height: the image size in pixels (for clipping).

    Returns:
        ``np.ndarray[N, 4]`` float32 0-based xyxy in image pixels.
    """
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, 4)
    start = offset + stride * cells[:, :2] - stride / 2
    end = offset + stride * (cells[:, 2:] - 1) + stride / 2
    boxes = np.concatenate([start, end], axis=1)
    limits = np.array([width, height, width, height], dtype=np.float64)
    return np.clip(boxes, 0, limits).astype(np.float32)
