"""Slow, obvious reference implementations that the fast ops are tested against."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def spp_loop(feature_map: Tensor, cells: Tensor, levels: Sequence[int]) -> Tensor:
    """SPP written straight from the bin formula: window by window, level by level, bin by bin.

    Bin ``i`` of level ``n`` over ``w`` cells covers ``[floor(i w / n), ceil((i + 1) w / n))``
    (integer arithmetic), max over the bin; output level by level, each ``[C, n, n]``.
    """
    channels = feature_map.shape[0]
    rows = []
    for x0, y0, x1, y1 in cells.tolist():
        w, h = x1 - x0 + 1, y1 - y0 + 1
        parts = []
        for n in levels:
            out = torch.empty(channels, n, n, dtype=feature_map.dtype)
            for iy in range(n):
                ys, ye = y0 + (iy * h) // n, y0 + math.ceil((iy + 1) * h / n)
                for ix in range(n):
                    xs, xe = x0 + (ix * w) // n, x0 + math.ceil((ix + 1) * w / n)
                    out[:, iy, ix] = feature_map[:, ys:ye, xs:xe].amax(dim=(1, 2))
            parts.append(out.reshape(-1))
        rows.append(torch.cat(parts))
    if not rows:
        return feature_map.new_zeros((0, channels * sum(n * n for n in levels)))
    return torch.stack(rows)
