"""AML, approximate max-pooling localisation (Tolias et al., ICLR 2016, section 5; the
released ``aml.c`` and ``test.m``, docs/sources.md 5.1).

For a database image and a query, find the rectangle ``R`` of the database image's map
whose approximate MAC (:mod:`~spp_detect.retrieval.integral`, alpha = 10) has the largest
cosine similarity with the query's MAC (L2-normalised, not whitened):

1. **Quantised maps** (:func:`quantize_levels`): the release stores database maps as
   ``floor((15 + min(x, 128)) / 16)`` in 0..8 and localises on those levels.
2. **Coarse search**: every box whose corners lie on a grid of step ``t = 3`` cells (at
   least 2 cells high and wide, as ``aml.c``'s loops), kept only when its aspect ratio
   (rows / columns) is within a factor ``s = 1.1`` of the query's (height / width);
   all scored at once.
3. **Refinement**: coordinate descent from the best coarse box, moving one side at a time
   by ``3, 2, 1`` cells, at most 5 sweeps per step, accepting a move when it improves
   the score (``rf_step 3``, ``rf_iter 5``). This part is sequential by nature (each move
   starts from the previous best).

All three steps are compiled with numba (:func:`_localize`: the integral image, every
candidate's score and the refinement in one call, no Python per box), and
:func:`aml_localize_many` runs many images in parallel threads. Scores are cosines of
float64 generalised maxima (four integral-image lookups per channel, then the 10th roots of
all channels in SIMD lanes by Newton's method, :func:`_root10`, within 2 ulp of ``pow``;
dot and norm in float64, summed in SIMD order); the integral of the quantised levels' 10th
powers is exact (integers below 2^53), so it does not depend on the summation order.

Departures from the release, each documented where it happens: the 10th root is exact to
2 ulp (``aml.c`` rounds it to an integer through its ``pow_10`` table); the quantisation cap
``128`` is a constant for MatConvNet's VGG16 and is rescaled here to the backbone's
activation range (:func:`quantize_levels`, ``cap``).

Frame: boxes are integer half-open map-cell rectangles ``(x1, y1, x2, y2)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import Tensor

from spp_detect.retrieval.integral import ALPHA, IntegralImage

__all__ = [
    "RELEASE_CAP",
    "GRID_STEP",
    "RATIO_TOLERANCE",
    "REFINE_STEP",
    "REFINE_ITERATIONS",
    "AMLResult",
    "quantize_levels",
    "coarse_boxes",
    "aml_localize",
    "aml_localize_many",
    "level_integral",
]

#: Activations are clipped here before quantisation (``conv3d >= 128``, test.m), in the
#: units of MatConvNet's VGG16; see :func:`quantize_levels` for other backbones.
RELEASE_CAP: float = 128.0
#: Grid step ``t`` of the coarse search (``step_box = 3``, test.m; paper section 5).
GRID_STEP: int = 3
#: Aspect-ratio tolerance ``s`` (``qratio_t = 1.1``, test.m; paper section 5).
RATIO_TOLERANCE: float = 1.1
#: First refinement step (``rf_step = 3``, test.m); steps go 3, 2, 1 (aml.c box_refine).
REFINE_STEP: int = 3
#: Sweeps per refinement step at most (``rf_iter = 5``, test.m).
REFINE_ITERATIONS: int = 5
#: ``k ** 10`` for the quantised levels 0..8 (aml.c's ``pow_10`` table, first entries).
_POW10 = torch.arange(9, dtype=torch.float64) ** ALPHA


def quantize_levels(maps: Tensor, cap: float = RELEASE_CAP) -> Tensor:
    """The release's quantisation ``floor((15 + min(x, 128)) / 16)``, with ``x`` rescaled
    by ``128 / cap`` first.

    ``cap = 128`` is the release's rule exactly (MatConvNet VGG16 units). Other backbones
    have other ranges (SqueezeNet's fire9 reaches ~1000, MobileNetV2's block 13 ~25), so the
    index calibrates ``cap`` on its whitening images (``spp_detect.retrieval.index``).

    Args:
        maps: ``Tensor[C, H, W]`` non-negative float map.

    Returns:
        ``Tensor[C, H, W]`` uint8 levels in 0..8 (0 for ``x < cap / 128``).
    """
    if cap <= 0:
        raise ValueError(f"quantize_levels: cap must be positive, got {cap}")
    scaled = maps.float().clamp_min(0) * (RELEASE_CAP / cap)
    return torch.floor((15 + scaled.clamp_max(RELEASE_CAP)) / 16).to(torch.uint8)


@dataclass(frozen=True)
class AMLResult:
    """The localised box (``np.ndarray[4]`` int64 half-open cells ``(x1, y1, x2, y2)``),
    its cosine similarity to the query MAC, and how many boxes were scored."""

    box: np.ndarray
    score: float
    evaluated: int


def level_integral(levels: Tensor) -> IntegralImage:
    """The integral image of ``levels ** 10`` of a quantised map (``aml.c``'s
    ``create_integralimage`` with its ``pow_10`` table); build once, localise many queries."""
    return IntegralImage(levels, ALPHA, table=_POW10)


def coarse_boxes(height: int, width: int, query_ratio: float, step: int = GRID_STEP,
                 ratio_tolerance: float = RATIO_TOLERANCE) -> Tensor:
    """The coarse-search candidates of ``aml.c`` (``max_score``) on a ``height x width`` map.

    Corners on a grid of ``step`` cells: ``y1 = 0, step, ...`` up to ``height - 2``,
    ``y2 = y1 + 2, y1 + 2 + step, ...`` up to ``height`` (the release's 1-based ``i1``,
    ``i2 = i1 + 1 + k step``); the same for x. A box is kept when
    ``|log(query_ratio / ((y2 - y1) / (x2 - x1)))| <= log(ratio_tolerance)``; a
    non-positive ``query_ratio`` keeps all.

    Returns:
        ``Tensor[N, 4]`` int64 half-open cell boxes (maybe empty, e.g. for 1-cell maps).
    """
    def pairs(side: int) -> np.ndarray:
        starts = np.arange(0, side - 1, step)
        ends = [np.arange(s + 2, side + 1, step) for s in starts]
        return np.array([(s, e) for s, row in zip(starts, ends) for e in row], dtype=np.int64).reshape(-1, 2)

    rows, cols = pairs(height), pairs(width)  # [Ny, 2], [Nx, 2]
    if len(rows) == 0 or len(cols) == 0:
        return torch.zeros((0, 4), dtype=torch.int64)
    heights = (rows[:, 1] - rows[:, 0]).astype(np.float64)
    widths = (cols[:, 1] - cols[:, 0]).astype(np.float64)
    keep = np.ones((len(rows), len(cols)), dtype=bool)
    if query_ratio > 0:
        ratio = heights[:, None] / widths[None, :]
        keep = np.abs(np.log(query_ratio / ratio)) <= math.log(ratio_tolerance)
    iy, ix = np.nonzero(keep)
    boxes = np.stack([cols[ix, 0], rows[iy, 0], cols[ix, 1], rows[iy, 1]], axis=1)
    return torch.from_numpy(boxes)


@numba.njit(cache=True)
def _integral(levels: np.ndarray, pow_table: np.ndarray) -> np.ndarray:
    """``levels uint8[C, H, W]`` -> ``float64[(H + 1) * (W + 1), C]``: row ``y (W + 1) + x``
    sums ``pow_table[level]`` over cells ``[0, x) x [0, y)`` (as :class:`IntegralImage`)."""
    channels, height, width = levels.shape
    w1 = width + 1
    table = np.zeros(((height + 1) * w1, channels), dtype=np.float64)
    for y in range(height):
        for x in range(width):
            here, up, left, diag = (y + 1) * w1 + x + 1, y * w1 + x + 1, (y + 1) * w1 + x, y * w1 + x
            for c in range(channels):
                table[here, c] = pow_table[levels[c, y, x]] + table[up, c] + table[left, c] - table[diag, c]
    return table


assert ALPHA == 10, "the compiled AML takes 10th roots (_root10)"
#: float64 exponent bias in place (``1023 << 52``): ``bits(t) / 10`` around it is ``t ** 0.1``
#: to within ~7% (the classic bit-level first guess of a root).
_EXPONENT_BIAS = np.int64(1023) << np.int64(52)


@numba.njit(cache=True, fastmath={"contract"}, error_model="numpy", inline="always")
def _newton10(y, t):
    """One Newton step on ``y^10 = t``: ``0.9 y + 0.1 t / y^9``."""
    y2 = y * y
    y4 = y2 * y2
    return 0.9 * y + 0.1 * t / (y4 * y4 * y)


@numba.njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _root10(totals, guess_bits, out):
    """``out = totals ** 0.1`` for ``totals`` float64 ``[C]`` >= 0 (0 stays 0), in SIMD
    lanes: a first guess from the exponent bits, then five Newton steps on ``y^10 = t``
    (relative error 7% -> 2e-2 -> 2e-3 -> 2e-5 -> 2e-9 -> rounding; measured within 2 ulp of
    ``pow``, ~4x faster). ``guess_bits`` is int64 scratch ``[C]``."""
    bits = totals.view(np.int64)
    for i in range(totals.shape[0]):
        guess_bits[i] = np.int64(np.float64(bits[i] - _EXPONENT_BIAS) * 0.1) + _EXPONENT_BIAS
    guess = guess_bits.view(np.float64)
    for i in range(totals.shape[0]):
        t = totals[i]
        out[i] = _newton10(_newton10(_newton10(_newton10(_newton10(guess[i], t), t), t), t), t)
    for i in range(totals.shape[0]):
        if totals[i] <= 0.0:
            out[i] = 0.0


@numba.njit(cache=True, fastmath=True)
def _cosine(values, query):
    """Cosine of ``values`` (float64 ``[C]``, finite) with the unit ``query``; 0 for a zero vector."""
    dot = 0.0
    norm = 0.0
    for ch in range(values.shape[0]):
        dot += values[ch] * query[ch]
        norm += values[ch] * values[ch]
    return dot / math.sqrt(norm) if norm > 0.0 else 0.0


@numba.njit(cache=True, inline="always")
def _box_cosine(table, w1, query, scratch, guess_bits, values, x1, y1, x2, y2) -> float:
    """Cosine of the box's generalised-max vector with the unit ``query``; 0 for a zero
    vector. ``scratch``, ``values`` (float64) and ``guess_bits`` (int64) are ``[C]`` scratch."""
    a, b, c, d = y2 * w1 + x2, y1 * w1 + x2, y2 * w1 + x1, y1 * w1 + x1
    ta, tb, tc, td = table[a], table[b], table[c], table[d]
    for ch in range(table.shape[1]):
        scratch[ch] = ta[ch] - tb[ch] - tc[ch] + td[ch]  # integers below 2^53: exact in any order
    _root10(scratch, guess_bits, values)
    return _cosine(values, query)


@numba.njit(cache=True)
def _localize(levels, pow_table, query, candidates, refine_step, refine_iterations):
    """One image: integral, coarse search (first maximum), then aml.c's ``box_refine``.
    Returns ``(box int64[4] (x1, y1, x2, y2), score, evaluated)``."""
    _, height, width = levels.shape
    table = _integral(levels, pow_table)
    w1 = width + 1
    channels = table.shape[1]
    scratch, values, guess_bits = np.empty(channels), np.empty(channels), np.empty(channels, dtype=np.int64)
    best = np.array([0, 0, width, height], dtype=np.int64)
    evaluated = candidates.shape[0]
    if evaluated:
        best_score = -np.inf
        for k in range(evaluated):
            value = _box_cosine(table, w1, query, scratch, guess_bits, values, candidates[k, 0], candidates[k, 1], candidates[k, 2], candidates[k, 3])
            if value > best_score:  # strict: the first maximum, as aml.c
                best_score = value
                best[:] = candidates[k]
    else:
        best_score = _box_cosine(table, w1, query, scratch, guess_bits, values, 0, 0, width, height)
        evaluated = 1
    trial = np.empty(4, dtype=np.int64)
    for move in range(refine_step, 0, -1):
        for _ in range(refine_iterations):
            changed = False
            # aml.c order: rows (i1 -, i1 +, i2 -, i2 +), then columns (j1 -, j1 +, j2 -, j2 +);
            # a side moves only while the box keeps >= 2 cells and stays inside the map.
            for axis in (1, 0):
                limit = height if axis == 1 else width
                lo, hi = axis, axis + 2
                for k in range(4):
                    side = lo if k < 2 else hi
                    delta = -move if k % 2 == 0 else move
                    trial[:] = best
                    trial[side] += delta
                    if trial[lo] < 0 or trial[hi] > limit or trial[hi] - trial[lo] < 2:
                        continue
                    value = _box_cosine(table, w1, query, scratch, guess_bits, values, trial[0], trial[1], trial[2], trial[3])
                    evaluated += 1
                    if value > best_score:
                        best[:] = trial
                        best_score = value
                        changed = True
            if not changed:
                break
    return best, best_score, evaluated


@numba.njit(cache=True, parallel=True)
def _localize_many(levels_list, pow_table, query, candidates_list, refine_step, refine_iterations):
    count = len(levels_list)
    boxes = np.zeros((count, 4), dtype=np.int64)
    scores = np.zeros(count, dtype=np.float64)
    evaluated = np.zeros(count, dtype=np.int64)
    for k in numba.prange(count):
        i = np.int64(k)  # typed-list indices are signed
        box, score, n = _localize(levels_list[i], pow_table, query, candidates_list[i], refine_step,
                                  refine_iterations)
        boxes[i] = box
        scores[i] = score
        evaluated[i] = n
    return boxes, scores, evaluated


def _unit_query(query_mac: np.ndarray | Tensor) -> np.ndarray:
    query = np.asarray(query_mac, dtype=np.float64).ravel()
    return np.ascontiguousarray(query / max(float(np.linalg.norm(query)), 1e-300))


def aml_localize_many(
    levels: Sequence[Tensor | np.ndarray],
    query_mac: np.ndarray | Tensor,
    query_ratio: float,
    *,
    step: int = GRID_STEP,
    ratio_tolerance: float = RATIO_TOLERANCE,
    refine_step: int = REFINE_STEP,
    refine_iterations: int = REFINE_ITERATIONS,
) -> list[AMLResult]:
    """:func:`aml_localize` of one query in many images (``levels``: ``[C, H, W]`` uint8
    maps of any sizes), the images in parallel threads."""
    if not len(levels):
        return []
    maps = numba.typed.List([np.ascontiguousarray(np.asarray(m, dtype=np.uint8)) for m in levels])
    grids: dict[tuple[int, int], np.ndarray] = {}
    candidates = numba.typed.List()
    for m in maps:
        shape = (int(m.shape[1]), int(m.shape[2]))
        if shape not in grids:
            grids[shape] = np.ascontiguousarray(coarse_boxes(*shape, query_ratio, step, ratio_tolerance).numpy())
        candidates.append(grids[shape])
    boxes, scores, evaluated = _localize_many(maps, _POW10.numpy(), _unit_query(query_mac), candidates, refine_step,
                                              refine_iterations)
    return [AMLResult(boxes[i].copy(), float(scores[i]), int(evaluated[i])) for i in range(len(maps))]


def aml_localize(
    levels: Tensor,
    query_mac: np.ndarray | Tensor,
    query_ratio: float,
    *,
    step: int = GRID_STEP,
    ratio_tolerance: float = RATIO_TOLERANCE,
    refine_step: int = REFINE_STEP,
    refine_iterations: int = REFINE_ITERATIONS,
) -> AMLResult:
    """Localise the query in one database image (``aml.c``: ``max_score`` then ``box_refine``).

    Args:
        levels: ``Tensor[C, H, W]`` uint8 quantised map (:func:`quantize_levels`).
        query_mac: ``[C]`` MAC of the query (normalised here).
        query_ratio: the query's height / width (pixels); boxes of the coarse search keep
            their rows / columns within ``ratio_tolerance`` of it.
        step, ratio_tolerance, refine_step, refine_iterations: the release's ``t``, ``s``,
            ``rf_step``, ``rf_iter``.

    Returns:
        :class:`AMLResult`; the whole map when the map is too small for any candidate.
    """
    return aml_localize_many([levels], query_mac, query_ratio, step=step, ratio_tolerance=ratio_tolerance,
                             refine_step=refine_step, refine_iterations=refine_iterations)[0]
