"""Spatial pyramid pooling of many windows on one conv map (SPP-net, section 2.3 and 4.1).

The bin rule (SPP-net 2.3: window size ``ceil(a/n)``, stride ``floor(a/n)``; the release's
``spm_pool_caffe_mex.cpp``): over a window ``w`` cells wide, bin ``i`` of an ``n``-level
covers cells ``[floor(i w / n), ceil((i + 1) w / n))`` from the window's start, and the
same in y. Bins may overlap; none is empty. Each bin is the max over its cells, so a
pooled value is one of the map's values, bit for bit.

Two implementations compute exactly these bins, in integer arithmetic, for any level:

* **CPU kernel** (the CPU default, :func:`_pool_cpu`): a numba-compiled loop over windows
  in parallel, reading the map channels-last (``[H, W, C]``) so that every bin is a max of
  contiguous ``C``-vectors (vectorised over ``C``). A level that divides a finer one of the
  pyramid (1, 2, 3 of 6) is the max over groups of the finer level's bins: bin ``i`` of
  ``n = m / k`` covers ``[floor(i k w / m), ceil((i + 1) k w / m))``, the union of bins
  ``i k .. i k + k - 1`` of level ``m``. The map is read once per window for the paper's
  pyramid instead of four times. ``bench/spp_pool.py``: 2,000 windows in ~44 ms into a
  reused buffer on 2 cores, ~10 ms of it arithmetic; the rest is writing the 205 MB output.
* **roi_pool** (other devices, and whenever autograd needs a gradient through the op,
  :func:`_pool_roi`): ``torchvision.ops.roi_pool`` with ``spatial_scale = 1`` on integer cell
  boxes computes the bins as ``floor(i * (w / n))`` / ``ceil((i + 1) * (w / n))`` in float32.
  That equals the integer rule for every ``w <= MAX_WINDOW_CELLS`` when ``n`` is 1-6, 8, 9,
  10, 12 or 16 (:func:`exact_level` checks exhaustively), but not for 7, 11, 13, 14, 15
  (float32 rounding first bites at w = 57, 29, 7, 57, 241). For those levels every bin is
  pooled as its own 1 x 1 roi (bin edges computed in integers), which is exact.

``tests/test_spp.py`` checks both against the loop reference, value for value, for every
level from 1 to 16.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numba
import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import roi_pool

from spp_detect.device import same_device

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
#: Largest window side (cells) accepted; roi_pool's float32 bin edges are proven exact up to
#: here for the levels it runs at n x n.
MAX_WINDOW_CELLS: int = 4096


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
    feature_map: Tensor, cells: Tensor, levels: Sequence[int] = PAPER_LEVELS, out: Tensor | None = None
) -> Tensor:
    """Pool each window of ``cells`` on ``feature_map`` with a spatial pyramid.

    Args:
        feature_map: ``Tensor[C, H, W]`` float conv map of one image at one scale. On the CPU
            a map stored channels-last (``feature_map.permute(1, 2, 0)`` contiguous, as
            :func:`spp_detect.cache.decode_map` returns it) is read in place; any other
            layout is copied once.
        cells: ``Tensor[N, 4]`` integer, inclusive cell ranges ``(x0, y0, x1, y1)`` with
            ``0 <= x0 <= x1 < W`` and ``0 <= y0 <= y1 < H`` (:func:`spp_detect.windows.windows_to_cells`).
        levels: pyramid levels ``n >= 1`` (an ``n x n`` grid each), in output order.
        out: optional ``Tensor[N, C * sum(n * n)]`` contiguous, of ``feature_map``'s dtype (or
            bfloat16: each value rounded to nearest, as ``.to(torch.bfloat16)``, half the bytes
            to write) and device, to write into (a reused buffer spares allocating, and
            page-faulting, hundreds of MB per image); returned.

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
    levels = tuple(int(n) for n in levels)
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"levels must be positive integers, got {levels}")
    channels, height, width = feature_map.shape
    num = cells.shape[0]
    shape = (num, channels * pyramid_bins(levels))
    if out is not None and (tuple(out.shape) != shape or out.dtype not in (feature_map.dtype, torch.bfloat16)
                            or not same_device(out.device, feature_map.device) or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {feature_map.dtype} (or bfloat16) tensor of shape {shape} "
                         f"on {feature_map.device}")
    if num == 0:
        return out if out is not None else feature_map.new_zeros(shape)
    _check_cells(cells, height, width)
    needs_grad = torch.is_grad_enabled() and feature_map.requires_grad
    if feature_map.device.type == "cpu" and not needs_grad and feature_map.dtype in (torch.float32, torch.float64):
        return _pool_cpu(feature_map, cells, levels, out)
    pooled = _pool_roi(feature_map, cells.to(feature_map.device), levels)
    return pooled if out is None else out.copy_(pooled)


def _pyramid_plan(levels: tuple[int, ...], channels: int) -> tuple[np.ndarray, ...]:
    """The kernel's plan: distinct levels finest first, each pooled directly or from the
    smallest finer level it divides, their rows in the per-window scratch, and where each
    output level (in the given order) comes from and goes."""
    distinct = sorted(set(levels), reverse=True)
    source, rows, row = [], [], 0
    for j, n in enumerate(distinct):
        finer = [i for i in range(j) if distinct[i] % n == 0]
        source.append(min(finer, key=lambda i: distinct[i]) if finer else -1)
        rows.append(row)
        row += n * n
    out_level = [distinct.index(n) for n in levels]
    out_column = np.cumsum([0] + [channels * n * n for n in levels[:-1]])
    as_array = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return as_array(distinct), as_array(source), as_array(rows), as_array(out_level), as_array(out_column)


def _pool_cpu(feature_map: Tensor, cells: Tensor, levels: tuple[int, ...], out: Tensor | None) -> Tensor:
    channels = feature_map.shape[0]
    hwc = feature_map.detach().permute(1, 2, 0)
    if not hwc.is_contiguous():
        hwc = hwc.contiguous()
    if out is None:
        out = torch.empty((cells.shape[0], channels * pyramid_bins(levels)), dtype=feature_map.dtype)
    torch_threads = torch.get_num_threads()
    threads = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    if torch.get_num_threads() != torch_threads:
        # numba's first launch of its OpenMP pool resets the process's OpenMP thread count
        # (to NUMBA_NUM_THREADS); torch's convs sum in another order with another count, so
        # a conv map would differ in its last bits before and after the first pooling
        torch.set_num_threads(torch_threads)
    args = (hwc.numpy(), cells.to(torch.int64).contiguous().numpy(), *_pyramid_plan(levels, channels))
    if out.dtype == torch.bfloat16:  # rounded as torch rounds float32 to bfloat16
        if hwc.dtype != torch.float32:
            args = (hwc.float().numpy(), *args[1:])
        _spp_kernel_bf16(*args, out.detach().view(torch.int16).numpy().view(np.uint16))
    else:
        _spp_kernel(*args, out.detach().numpy())
    return out


# fastmath nnan/ninf lets LLVM use the vector max instruction; every value pooled is a map
# value and the max of finite numbers is exact, so this changes no result on finite maps.
@numba.njit(cache=True, fastmath={"nnan", "ninf"}, inline="always")
def _pool_window(fmap, x0, y0, w, h, distinct, source, rows, bins):  # pragma: no cover - compiled
    """The bins of every distinct level of one window into ``bins`` ``[sum n*n, C]``."""
    num_channels = fmap.shape[2]
    for j in range(distinct.shape[0]):
        n = distinct[j]
        if source[j] < 0:  # max over the bin's cells
            for by in range(n):
                ys, ye = y0 + (by * h) // n, y0 + ((by + 1) * h + n - 1) // n
                for bx in range(n):
                    xs, xe = x0 + (bx * w) // n, x0 + ((bx + 1) * w + n - 1) // n
                    acc = bins[rows[j] + by * n + bx]
                    acc[:] = fmap[ys, xs]
                    for y in range(ys, ye):
                        for x in range(xs, xe):
                            cell = fmap[y, x]
                            for c in range(num_channels):
                                acc[c] = max(acc[c], cell[c])
        else:  # max over k x k bins of the finer level m = k n
            m = distinct[source[j]]
            k = m // n
            for by in range(n):
                for bx in range(n):
                    acc = bins[rows[j] + by * n + bx]
                    acc[:] = bins[rows[source[j]] + by * k * m + bx * k]
                    for dy in range(k):
                        for dx in range(k):
                            fine = bins[rows[source[j]] + (by * k + dy) * m + bx * k + dx]
                            for c in range(num_channels):
                                acc[c] = max(acc[c], fine[c])


@numba.njit(parallel=True, cache=True, fastmath={"nnan", "ninf"})
def _spp_kernel(fmap, cells, distinct, source, rows, out_level, out_column, out):  # pragma: no cover - compiled
    num_channels = fmap.shape[2]
    bins_rows = rows[-1] + distinct[-1] * distinct[-1]
    for i in numba.prange(cells.shape[0]):
        x0, y0 = cells[i, 0], cells[i, 1]
        bins = np.empty((bins_rows, num_channels), dtype=fmap.dtype)
        _pool_window(fmap, x0, y0, cells[i, 2] - x0 + 1, cells[i, 3] - y0 + 1, distinct, source, rows, bins)
        for lv in range(out_level.shape[0]):  # transpose [n*n, C] -> [C, n*n] into the output row
            j = out_level[lv]
            nn = distinct[j] * distinct[j]
            base = out_column[lv]
            for c in range(num_channels):
                for b in range(nn):
                    out[i, base + c * nn + b] = bins[rows[j] + b, c]


@numba.njit(parallel=True, cache=True, fastmath={"nnan", "ninf"})
def _spp_kernel_bf16(fmap, cells, distinct, source, rows, out_level, out_column, out):  # pragma: no cover - compiled
    """:func:`_spp_kernel` writing bfloat16 bit patterns (``uint16``) of float32 bins, rounded
    to nearest, ties to even (as ``torch.Tensor.to(torch.bfloat16)``; maps hold no NaN)."""
    num_channels = fmap.shape[2]
    bins_rows = rows[-1] + distinct[-1] * distinct[-1]
    for i in numba.prange(cells.shape[0]):
        x0, y0 = cells[i, 0], cells[i, 1]
        bins = np.empty((bins_rows, num_channels), dtype=np.float32)
        _pool_window(fmap, x0, y0, cells[i, 2] - x0 + 1, cells[i, 3] - y0 + 1, distinct, source, rows, bins)
        bits = bins.view(np.uint32)
        for lv in range(out_level.shape[0]):
            j = out_level[lv]
            nn = distinct[j] * distinct[j]
            base = out_column[lv]
            for c in range(num_channels):
                for b in range(nn):
                    v = bits[rows[j] + b, c]
                    out[i, base + c * nn + b] = np.uint16((v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


def _pool_roi(feature_map: Tensor, cells: Tensor, levels: tuple[int, ...]) -> Tensor:
    """``torchvision.ops.roi_pool``: ``n x n`` where :func:`exact_level`, else one 1 x 1 roi
    per bin with integer edges; coarser levels dividing a finer one from its bins."""
    channels = feature_map.shape[0]
    num = cells.shape[0]
    batch = feature_map.unsqueeze(0).contiguous()
    rois = torch.cat([cells.new_zeros((num, 1)), cells], dim=1).to(feature_map.dtype)  # [N, 5]
    pooled: dict[int, Tensor] = {}  # level -> [N, C, n, n]
    for n in sorted(set(levels), reverse=True):
        finer = min((m for m in pooled if m % n == 0), default=None)
        if finer is not None:
            k = finer // n
            pooled[n] = pooled[finer].view(num, channels, n, k, n, k).amax(dim=(3, 5))
        elif exact_level(n):
            pooled[n] = roi_pool(batch, rois, output_size=(n, n), spatial_scale=1.0)
        else:
            pooled[n] = _roi_pool_per_bin(batch, cells, n)
    return torch.cat([pooled[n].reshape(num, -1) for n in levels], dim=1)


def _roi_pool_per_bin(batch: Tensor, cells: Tensor, n: int) -> Tensor:
    """Level ``n`` as ``N * n * n`` one-bin rois whose edges are the integer rule's."""
    num = cells.shape[0]
    x0, y0, x1, y1 = cells.unbind(1)
    w, h = (x1 - x0 + 1)[:, None], (y1 - y0 + 1)[:, None]  # [N, 1]
    i = torch.arange(n, device=cells.device)[None]  # [1, n]
    xs, xe = x0[:, None] + i * w // n, x0[:, None] + ((i + 1) * w + n - 1) // n - 1  # inclusive, [N, n]
    ys, ye = y0[:, None] + i * h // n, y0[:, None] + ((i + 1) * h + n - 1) // n - 1
    boxes = torch.stack(
        [xs[:, None, :].expand(num, n, n), ys[:, :, None].expand(num, n, n),
         xe[:, None, :].expand(num, n, n), ye[:, :, None].expand(num, n, n)], dim=-1
    ).reshape(-1, 4)  # [N * n * n, 4], bins y-major
    rois = torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], dim=1).to(batch.dtype)  # all on image 0
    bins = roi_pool(batch, rois, output_size=(1, 1), spatial_scale=1.0)  # [N * n * n, C, 1, 1]
    return bins.view(num, n, n, -1).permute(0, 3, 1, 2)  # [N, C, n, n]


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
