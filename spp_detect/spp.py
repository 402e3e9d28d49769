"""Spatial pyramid pooling of many windows on one conv map (SPP-net, section 2.3 and 4.1).

The bin rule (SPP-net 2.3: window size ``ceil(a/n)``, stride ``floor(a/n)``; the release's
``spm_pool_caffe_mex.cpp``): over a window ``w`` cells wide, bin ``i`` of an ``n``-level
covers cells ``[floor(i w / n), ceil((i + 1) w / n))`` from the window's start, and the
same in y. Bins may overlap; none is empty. Each bin is the max over its cells.

Implementation: ``torchvision.ops.roi_pool`` with ``spatial_scale = 1`` on integer cell
boxes computes these bins with ``floor(i * (w / n))`` / ``ceil((i + 1) * (w / n))`` in
float32. That equals the integer formula for every ``w <= MAX_WINDOW_CELLS`` when ``n`` is
1-6, 8, 9, 10, 12 or 16, but not for 7, 11, 13, 14, 15 (float32 rounding first bites at
w = 57, 29, 7, 57, 241). :func:`exact_level` checks a level exhaustively and unsupported
levels are refused; ``tests/test_spp.py`` also checks the op against a loop reference. Coarser
levels that divide a finer one (1, 2, 3 of 6) are unions of the finer level's bins:
``[floor(i w / n), ceil((i + 1) w / n))`` with ``n = m / k`` is the union of bins
``i k .. i k + k - 1`` of level ``m``. They are taken as maxima over groups of the finer
output, which roughly halves the cost of the paper's {1, 2, 3, 6} pyramid.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import roi_pool

__all__ = [
    "PAPER_LEVELS",
    "MAX_WINDOW_CELLS",
    "exact_level",
    "pyramid_bins",
    "spatial_pyramid_pool",
    "SpatialPyramidPool",
]

#: The 4-level pyramid of SPP-net detection (paper 4.1: 1x1, 2x2, 3x3, 6x6 = 50 bins), in
#: the concat order of the released classifier (Zeiler_conv5.prototxt: spm1, spm2, spm3, spm6).
PAPER_LEVELS: tuple[int, ...] = (1, 2, 3, 6)
#: Largest window side (cells) for which roi_pool's float32 bin edges are proven exact.
MAX_WINDOW_CELLS: int = 4096
#: On the CPU, torchvision's roi_pool runs on one thread; windows are split into chunks of
#: at least this many and pooled on ``torch.get_num_threads()`` threads (it releases the
#: GIL). bench/spp_pool.py: ~1.7x on 2 cores for 2,000 windows.
_MIN_WINDOWS_PER_THREAD = 128


def pyramid_bins(levels: Sequence[int]) -> int:
    """Number of bins of a pyramid: ``sum(n * n)`` (50 for the paper's levels)."""
    return sum(n * n for n in levels)


@lru_cache(maxsize=None)
def exact_level(n: int) -> bool:
    """Whether roi_pool's float32 bin edges equal ``floor(i w / n)``, ``ceil((i + 1) w / n)``
    for every window width ``w`` up to :data:`MAX_WINDOW_CELLS` (checked exhaustively)."""
    w = np.arange(1, MAX_WINDOW_CELLS + 1, dtype=np.int64)
    bin_size = w.astype(np.float32) / np.float32(n)
    for i in range(n):
        start = np.floor(np.float32(i) * bin_size).astype(np.int64)
        end = np.ceil(np.float32(i + 1) * bin_size).astype(np.int64)
        if not (np.array_equal(start, (i * w) // n) and np.array_equal(end, -((-(i + 1) * w) // n))):
            return False
    return True


def spatial_pyramid_pool(
    feature_map: Tensor, cells: Tensor, levels: Sequence[int] = PAPER_LEVELS
) -> Tensor:
    """Pool each window of ``cells`` on ``feature_map`` with a spatial pyramid.

    Args:
        feature_map: ``Tensor[C, H, W]`` float conv map of one image at one scale.
        cells: ``Tensor[N, 4]`` integer, inclusive cell ranges ``(x0, y0, x1, y1)`` with
            ``0 <= x0 <= x1 < W`` and ``0 <= y0 <= y1 < H`` (:func:`spp_detect.windows.windows_to_cells`).
        levels: pyramid levels ``n`` (an ``n x n`` grid each), in output order; each must
            pass :func:`exact_level` (all of 1-6, 8, 9, 10, 12, 16 do).

    Returns:
        ``Tensor[N, C * sum(n * n)]``, same dtype and device as ``feature_map``: level by
        level in the given order, each level laid out ``[C, n, n]`` (channel-major, then
        y, then x fastest), as the released SPP-net writes ``pooled[d*n*n + y*n + x]``.
        Zero windows give ``Tensor[0, C * sum(n * n)]``.

    Example: a window of 5 cells and level 3 has bins [0, 2), [1, 4), [3, 5).
    """
    if feature_map.ndim != 3:
        raise ValueError(f"feature_map must be [C, H, W], got shape {tuple(feature_map.shape)}")
    if cells.ndim != 2 or cells.shape[1] != 4:
        raise ValueError(f"cells must be [N, 4], got shape {tuple(cells.shape)}")
    if not levels or any(int(n) < 1 for n in levels):
        raise ValueError(f"levels must be positive integers, got {tuple(levels)}")
    inexact = [int(n) for n in levels if not exact_level(int(n))]
    if inexact:
        raise ValueError(f"pyramid levels {inexact} are not supported: roi_pool's float32 bin edges are not exact there")
    channels, height, width = feature_map.shape
    num = cells.shape[0]
    if num == 0:
        return feature_map.new_zeros((0, channels * pyramid_bins(levels)))
    cells = cells.to(device=feature_map.device)
    _check_cells(cells, height, width)

    rois = torch.cat([cells.new_zeros((num, 1)), cells], dim=1).to(feature_map.dtype)  # [N, 5]
    batch = feature_map.unsqueeze(0)
    pooled: dict[int, Tensor] = {}  # level -> [N, C, n, n]
    for n in sorted(set(int(v) for v in levels), reverse=True):
        finer = min((m for m in pooled if m % n == 0), default=None)
        if finer is None:
            pooled[n] = _roi_pool(batch, rois, n)
        else:
            k = finer // n
            pooled[n] = pooled[finer].view(num, channels, n, k, n, k).amax(dim=(3, 5))
    return torch.cat([pooled[int(n)].reshape(num, -1) for n in levels], dim=1)


@lru_cache(maxsize=1)
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spp-roi-pool")


def _roi_pool(batch: Tensor, rois: Tensor, n: int) -> Tensor:
    """``roi_pool`` at ``n x n`` with ``spatial_scale = 1``; CPU calls split over threads."""
    workers = min(torch.get_num_threads(), len(rois) // _MIN_WINDOWS_PER_THREAD)
    if batch.device.type != "cpu" or workers < 2 or torch.is_grad_enabled() and batch.requires_grad:
        return roi_pool(batch, rois, output_size=(n, n), spatial_scale=1.0)
    chunks = rois.chunk(workers)
    parts = _thread_pool(workers).map(lambda r: roi_pool(batch, r, output_size=(n, n), spatial_scale=1.0), chunks)
    return torch.cat(list(parts))


class SpatialPyramidPool(nn.Module):
    """Module form of :func:`spatial_pyramid_pool`; stores only ``levels``."""

    def __init__(self, levels: Sequence[int] = PAPER_LEVELS) -> None:
        super().__init__()
        self.levels = tuple(int(n) for n in levels)

    def forward(self, feature_map: Tensor, cells: Tensor) -> Tensor:
        """``Tensor[C, H, W]``, ``Tensor[N, 4]`` inclusive cells -> ``Tensor[N, C * sum(n*n)]``."""
        return spatial_pyramid_pool(feature_map, cells, self.levels)

    @property
    def bins(self) -> int:
        """Bins per channel (50 for the paper's pyramid)."""
        return pyramid_bins(self.levels)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(levels={self.levels})"


def _check_cells(cells: Tensor, height: int, width: int) -> None:
    x0, y0, x1, y1 = cells.unbind(1)
    bad = (x0 < 0) | (y0 < 0) | (x1 >= width) | (y1 >= height) | (x0 > x1) | (y0 > y1)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"cells[{i}] = {cells[i].tolist()} is not an inclusive range inside a {height} x {width} map"
        )
    if int((x1 - x0).max()) >= MAX_WINDOW_CELLS or int((y1 - y0).max()) >= MAX_WINDOW_CELLS:
        raise ValueError(f"windows wider than {MAX_WINDOW_CELLS} cells are not supported")
