"""Integral max-pooling (Tolias et al., ICLR 2016, section 4.1): the max over a rectangle,
approximated by the generalised sum ``(sum_p x_p^alpha)^(1/alpha)`` (alpha = 10) and read
in constant time per rectangle from integral images of ``x^alpha``.

Frame: rectangles are integer half-open map-cell boxes ``(x1, y1, x2, y2)``
(:mod:`spp_detect.retrieval.regions`). The integral image of a ``[C, H, W]`` map is
``I[H + 1, W + 1, C]`` with a zero first row and column, so the sum over ``[x1, x2) x
[y1, y2)`` is ``I[y2, x2] - I[y1, x2] - I[y2, x1] + I[y1, x1]``: four row lookups per
rectangle whatever its size, vectorised over rectangles.

Numerics: float64 throughout. For float maps each channel is divided by its maximum before
the power (the generalised sum is homogeneous, so the result is multiplied back), which
keeps ``x^10`` in range; the quantised maps of :mod:`spp_detect.retrieval.aml` hold small
integers whose powers are exact in float64. Tiny negative differences from rounding are
clamped to 0 before the root.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ALPHA", "IntegralImage", "integral_max_pool"]

#: Exponent of the generalised mean (paper section 4.1; ``p = 10``, test.m / aml.c).
ALPHA: float = 10.0


class IntegralImage:
    """Integral image of ``maps ** alpha``, stored channel-last for cheap box lookups.

    Args:
        maps: ``Tensor[C, H, W]`` non-negative (post-ReLU values or quantised levels).
        alpha: the exponent.
        table: optional ``Tensor[K]`` of precomputed ``k ** alpha`` for integer maps
            (the release's ``pow_10`` lookup); the map's values index it.

    ``table`` holds ``Tensor[(H + 1) * (W + 1), C]`` float64: row ``y * (W + 1) + x`` is the
    sum of ``maps ** alpha`` over cells ``[0, x) x [0, y)`` per channel.
    """

    def __init__(self, maps: Tensor, alpha: float = ALPHA, table: Tensor | None = None) -> None:
        if maps.ndim != 3:
            raise ValueError(f"IntegralImage: expected a [C, H, W] map, got shape {tuple(maps.shape)}")
        channels, height, width = maps.shape
        cells = maps.permute(1, 2, 0).contiguous()  # [H, W, C]
        if table is not None:
            powered = table.to(torch.float64)[cells.long()]
        else:
            powered = cells.to(torch.float64).clamp_min(0).pow(alpha)
        integral = torch.zeros((height + 1, width + 1, channels), dtype=torch.float64)
        torch.cumsum(powered, 0, out=integral[1:, 1:])
        torch.cumsum(integral[1:, 1:], 1, out=integral[1:, 1:])
        self.alpha = float(alpha)
        self.height, self.width, self.channels = height, width, channels
        self.table = integral.reshape(-1, channels)

    def power_sums(self, boxes: Tensor) -> Tensor:
        """``sum x^alpha`` over each box, four lookups per box.

        Args:
            boxes: ``Tensor[N, 4]`` int64 half-open cell boxes ``(x1, y1, x2, y2)``,
                ``0 <= x1 < x2 <= W``, ``0 <= y1 < y2 <= H``.

        Returns:
            ``Tensor[N, C]`` float64, clamped at 0.
        """
        boxes = torch.as_tensor(boxes, dtype=torch.int64).reshape(-1, 4)
        x1, y1, x2, y2 = boxes.unbind(1)
        w1 = self.width + 1
        corners = torch.stack([y2 * w1 + x2, y1 * w1 + x2, y2 * w1 + x1, y1 * w1 + x1])  # [4, N]
        values = self.table.index_select(0, corners.flatten()).view(4, len(boxes), self.channels)
        return (values[0] - values[1] - values[2] + values[3]).clamp_min(0)  # [N, C]

    def generalized_max(self, boxes: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """``(sum_box x^alpha)^(1/alpha)`` per box and channel: ``Tensor[N, C]`` of ``dtype``.

        The sums are always taken in float64 (the four-term difference cancels); only the
        root is taken in ``dtype`` (AML uses float32, twice as fast and exact to 1e-7).
        """
        return self.power_sums(boxes).to(dtype).pow(1.0 / self.alpha)


def integral_max_pool(maps: Tensor, boxes: Tensor, alpha: float = ALPHA) -> Tensor:
    """Approximate max-pooling of ``maps`` over many boxes: ``(sum_box x^alpha)^(1/alpha)``.

    Args:
        maps: ``Tensor[C, H, W]`` non-negative float map.
        boxes: ``Tensor[N, 4]`` int64 half-open cell boxes (see :meth:`IntegralImage.power_sums`).
        alpha: the exponent; the result is between the true max and ``area^(1/alpha)``
            times it, so it tends to the max as alpha grows.

    Returns:
        ``Tensor[N, C]`` float64.
    """
    scale = maps.to(torch.float64).flatten(1).amax(1).clamp_min(1e-300)  # [C], per-channel max
    integral = IntegralImage(maps.to(torch.float64) / scale[:, None, None], alpha)
    return integral.generalized_max(boxes) * scale
