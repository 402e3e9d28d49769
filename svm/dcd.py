"""liblinear's dual coordinate descent for the L2-regularised L1-loss (hinge) SVM, compiled
with numba, on half-precision examples, with a warm start.

The problem is liblinear ``-s 3`` exactly (Hsieh et al., *A Dual Coordinate Descent Method
for Large-scale Linear SVM*, ICML 2008, Algorithm 1 with the shrinking of section 3.2;
liblinear ``linear.cpp``, ``solve_l2r_l1l2_svc``): with ``x_i`` augmented by the bias
feature ``B`` (``-B``),

    min_w  1/2 |w|^2 + sum_i C_i max(0, 1 - y_i w . x_i)
    dual:  min_a  1/2 a' Q a - sum_i a_i,  0 <= a_i <= C_i,  Q_ij = y_i y_j x_i . x_j,

``C_i = C * pos_weight`` for positives and ``C`` for negatives (``-w1``). Each step
minimises the dual exactly in one ``a_i``; ``w = sum_i y_i a_i x_i`` is kept up to date.

Stopping rule (liblinear's): a sweep over the active examples in random order records the
projected gradients; stop when their spread ``max PG - min PG <= tol`` over all examples
(after shrinking, the check is redone once over the whole set), or after ``max_iter``
sweeps. liblinear's default for ``-s 3`` is ``tol = 0.1``, which the release ran.

Warm start: the caller passes the dual variables of a previous solve (hard-negative mining
retrains a class on its cache, which keeps most examples between retrains); they remain
feasible whatever examples were added (``a = 0``) or evicted, so the solve starts from
their ``w`` instead of from 0. The solution satisfies the same stopping rule either way.

Examples are rows of a ``float16`` matrix (the mining store's storage, shared by the
classes), named by a row index list and read in place: each row is widened exactly to
``float32`` in a scratch row when it is visited (numba has no CPU ``float16``; the widening
is a bit shift and one exact multiply, :func:`_widen_row`), so a solve copies nothing. ``w``
and all sums are ``float64``; the dot products are summed in SIMD order (same value to
rounding).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["DCD_MAX_ITER", "solve_dcd", "half_scores"]

#: Sweeps at most: liblinear's ``max_iter`` in ``solve_l2r_l1l2_svc`` (scikit-learn's
#: ``LinearSVC(max_iter=1000)`` default too).
DCD_MAX_ITER: int = 1000
#: ``float16`` bits shifted into ``float32`` position read as ``2**-112`` times the value
#: (normal and subnormal halves alike); one multiply by ``2**112`` makes them exact.
_HALF_TO_FLOAT = np.float32(2.0**112)


@numba.njit(cache=True, fastmath=True, nogil=True)
def _widen_row(half, bits, row):
    """``row[:] = half`` widened: ``half`` uint16 bits of float16 ``[D]``; ``bits`` is
    ``row`` (float32 ``[D]``) viewed as uint32. Exact for every finite half."""
    for j in range(half.shape[0]):
        v = np.uint32(half[j])
        bits[j] = ((v & np.uint32(0x8000)) << np.uint32(16)) | ((v & np.uint32(0x7FFF)) << np.uint32(13))
    for j in range(row.shape[0]):
        row[j] *= _HALF_TO_FLOAT


@numba.njit(cache=True, fastmath=True, nogil=True)
def _dot(w, row):
    """``w . row`` in float64; reassociated (SIMD) sums: the same value to rounding."""
    total = 0.0
    for j in range(row.shape[0]):
        total += w[j] * row[j]
    return total


@numba.njit(cache=True, fastmath=True, nogil=True)
def _sqnorm(row):
    """``|row|^2`` in float64 (each element widened before squaring), without a copy."""
    total = 0.0
    for j in range(row.shape[0]):
        total += np.float64(row[j]) * row[j]
    return total


@numba.njit(cache=True, fastmath=True, nogil=True)
def _axpy(coef, row, w):
    """``w += coef * row`` in float64."""
    for j in range(row.shape[0]):
        w[j] += coef * row[j]


@numba.njit(cache=True, nogil=True)
def _dcd(half, rows, y, alpha, c_pos, c_neg, bias_mult, tol, max_iter, seed):
    n = rows.shape[0]
    dim = half.shape[1]
    w = np.zeros(dim, dtype=np.float64)
    w_bias = 0.0  # weight of the bias feature (value bias_mult)
    row = np.empty(dim, dtype=np.float32)
    bits = row.view(np.uint32)
    qd = np.empty(n, dtype=np.float64)
    upper = np.empty(n, dtype=np.float64)
    for i in range(n):
        _widen_row(half[rows[i]], bits, row)
        qd[i] = _sqnorm(row) + bias_mult * bias_mult  # Q_ii (liblinear: diag 0 for L1 loss)
        upper[i] = c_pos if y[i] > 0 else c_neg
        alpha[i] = min(max(alpha[i], 0.0), upper[i])
        if alpha[i] != 0.0:
            coef = y[i] * alpha[i]
            _axpy(coef, row, w)
            w_bias += coef * bias_mult
    index = np.arange(n)
    active = n
    pg_max_old = np.inf
    pg_min_old = -np.inf
    np.random.seed(seed)
    sweeps = 0
    while sweeps < max_iter:
        pg_max_new = -np.inf
        pg_min_new = np.inf
        for k in range(active):  # liblinear's permutation: swap with a random later one
            r = k + np.random.randint(0, active - k)
            index[k], index[r] = index[r], index[k]
        k = 0
        while k < active:
            i = index[k]
            _widen_row(half[rows[i]], bits, row)
            grad = y[i] * (w_bias * bias_mult + _dot(w, row)) - 1.0
            pg = 0.0
            if alpha[i] == 0.0:
                if grad > pg_max_old:  # shrink: at the lower bound and will stay there
                    active -= 1
                    index[k], index[active] = index[active], index[k]
                    continue
                if grad < 0.0:
                    pg = grad
            elif alpha[i] == upper[i]:
                if grad < pg_min_old:  # shrink: at the upper bound and will stay there
                    active -= 1
                    index[k], index[active] = index[active], index[k]
                    continue
                if grad > 0.0:
                    pg = grad
            else:
                pg = grad
            pg_max_new = max(pg_max_new, pg)
            pg_min_new = min(pg_min_new, pg)
            if abs(pg) > 1.0e-12:
                old = alpha[i]
                alpha[i] = min(max(old - grad / qd[i], 0.0), upper[i])
                coef = (alpha[i] - old) * y[i]
                _axpy(coef, row, w)
                w_bias += coef * bias_mult
            k += 1
        sweeps += 1
        if pg_max_new - pg_min_new <= tol:
            if active == n:
                break
            active = n  # shrunk examples are checked once more before stopping
            pg_max_old = np.inf
            pg_min_old = -np.inf
            continue
        pg_max_old = pg_max_new if pg_max_new > 0.0 else np.inf
        pg_min_old = pg_min_new if pg_min_new < 0.0 else -np.inf
    return w, w_bias, sweeps


@numba.njit(cache=True, nogil=True)
def _scores(half, rows, w, b):
    out = np.empty(rows.shape[0], dtype=np.float64)
    row = np.empty(half.shape[1], dtype=np.float32)
    bits = row.view(np.uint32)
    for i in range(rows.shape[0]):
        _widen_row(half[rows[i]], bits, row)
        out[i] = _dot(w, row) + b
    return out


def _half_bits(examples: np.ndarray) -> np.ndarray:
    if examples.dtype != np.float16 or examples.ndim != 2:
        raise ValueError(f"expected a float16 [M, D] matrix, got {examples.dtype} {tuple(examples.shape)}")
    if not examples.flags.c_contiguous:
        examples = np.ascontiguousarray(examples)
    return examples.view(np.uint16)


def _rows(rows: np.ndarray | None, m: int) -> np.ndarray:
    if rows is None:
        return np.arange(m, dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= m)):
        raise ValueError(f"rows must be a 1-d index into the {m} examples")
    return rows


def solve_dcd(
    examples: np.ndarray,
    labels: np.ndarray,
    c_pos: float,
    c_neg: float,
    bias_mult: float,
    tol: float,
    alpha: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    max_iter: int = DCD_MAX_ITER,
    seed: int = 0,
) -> tuple[np.ndarray, float, np.ndarray, int]:
    """Solve liblinear ``-s 3`` on float16 examples, read in place.

    Args:
        examples: ``np.ndarray[M, D]`` float16; the problem's examples are its rows ``rows``.
        labels: ``np.ndarray[N]`` of +1 / -1, one per example of the problem.
        c_pos, c_neg: the cost of a positive (``C * pos_weight``) and of a negative (``C``).
        bias_mult: the bias feature ``B`` appended to every example (regularised).
        tol: the stopping tolerance on the projected-gradient spread (liblinear ``-e``).
        alpha: ``np.ndarray[N]`` float64 warm start (clipped into ``[0, C_i]``); zeros if None.
        rows: ``np.ndarray[N]`` int64 rows of ``examples`` (example ``i`` is
            ``examples[rows[i]]``); all ``M`` rows in order if None.
        seed: the sweep order's random seed.

    Returns:
        ``(w np.ndarray[D] float64, b float, alpha np.ndarray[N] float64, sweeps int)`` with
        ``score = w . x + b`` and ``b = B * w_bias`` (the release's ``w(end) * bias_mult``).
    """
    half = _half_bits(examples)
    rows = _rows(rows, len(half))
    n = len(rows)
    y = np.ascontiguousarray(labels, dtype=np.float64)
    if y.shape != (n,):
        raise ValueError(f"solve_dcd: labels must be [N] = [{n}], got {tuple(y.shape)}")
    alpha = np.zeros(n, dtype=np.float64) if alpha is None else np.array(alpha, dtype=np.float64)
    if alpha.shape != (n,):
        raise ValueError(f"solve_dcd: alpha must be [N] = [{n}], got {tuple(alpha.shape)}")
    w, w_bias, sweeps = _dcd(half, rows, y, alpha, float(c_pos), float(c_neg), float(bias_mult), float(tol), int(max_iter),
                             int(seed))
    return w, float(w_bias * bias_mult), alpha, int(sweeps)


def half_scores(examples: np.ndarray, w: np.ndarray, b: float, rows: np.ndarray | None = None) -> np.ndarray:
    """``np.ndarray[N]`` float64 scores ``w . x + b`` of the float16 rows ``rows`` of
    ``examples np.ndarray[M, D]`` (all if None), read in place; ``w np.ndarray[D]``."""
    half = _half_bits(examples)
    return _scores(half, _rows(rows, len(half)), np.ascontiguousarray(w, dtype=np.float64), float(b))
