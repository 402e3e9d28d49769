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

Examples arrive as ``float16`` (the mining caches' storage) and are widened exactly to
``float32`` for the solve (numba has no CPU ``float16``; the widened copy of one class's
problem lives only during its solve); ``w`` and all sums are ``float64``.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

__all__ = ["DCD_MAX_ITER", "solve_dcd"]

#: Sweeps at most: liblinear's ``max_iter`` in ``solve_l2r_l1l2_svc`` (scikit-learn's
#: ``LinearSVC(max_iter=1000)`` default too).
DCD_MAX_ITER: int = 1000


@numba.njit(cache=True, fastmath=True)
def _dot(w, row):
    """``w . row`` in float64; reassociated (SIMD) sums: the same value to rounding."""
    total = 0.0
    for j in range(row.shape[0]):
        total += w[j] * row[j]
    return total


@numba.njit(cache=True, fastmath=True)
def _axpy(coef, row, w):
    """``w += coef * row`` in float64."""
    for j in range(row.shape[0]):
        w[j] += coef * row[j]


@numba.njit(cache=True, fastmath=True)
def _sqnorm(row):
    """``|row|^2`` in float64."""
    total = 0.0
    for j in range(row.shape[0]):
        total += np.float64(row[j]) * row[j]
    return total


@numba.njit(cache=True)
def _dcd(x, y, alpha, c_pos, c_neg, bias_mult, tol, max_iter, seed):
    n, dim = x.shape
    w = np.zeros(dim, dtype=np.float64)
    w_bias = 0.0  # weight of the bias feature (value bias_mult)
    qd = np.empty(n, dtype=np.float64)
    upper = np.empty(n, dtype=np.float64)
    for i in range(n):
        row = x[i]
        qd[i] = _sqnorm(row) + bias_mult * bias_mult  # Q_ii (liblinear: diag 0 for the L1 loss)
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
            row = x[i]
            dot = w_bias * bias_mult + _dot(w, row)
            grad = y[i] * dot - 1.0
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


def solve_dcd(
    examples: np.ndarray,
    labels: np.ndarray,
    c_pos: float,
    c_neg: float,
    bias_mult: float,
    tol: float,
    alpha: np.ndarray | None = None,
    max_iter: int = DCD_MAX_ITER,
    seed: int = 0,
) -> tuple[np.ndarray, float, np.ndarray, int]:
    """Solve liblinear ``-s 3`` on ``float16`` examples.

    Args:
        examples: ``np.ndarray[N, D]`` float16 or float32 (widened to a float32 copy).
        labels: ``np.ndarray[N]`` of +1 / -1.
        c_pos, c_neg: the cost of a positive (``C * pos_weight``) and of a negative (``C``).
        bias_mult: the bias feature ``B`` appended to every example (regularised).
        tol: the stopping tolerance on the projected-gradient spread (liblinear ``-e``).
        alpha: ``np.ndarray[N]`` float64 warm start (clipped into ``[0, C_i]``); zeros if None.
        seed: the sweep order's random seed.

    Returns:
        ``(w np.ndarray[D] float64, b float, alpha np.ndarray[N] float64, sweeps int)`` with
        ``score = w . x + b`` and ``b = B * w_bias`` (the release's ``w(end) * bias_mult``).
    """
    x = torch.from_numpy(np.ascontiguousarray(examples)).float().numpy()  # torch widens float16 ~6x faster
    n = x.shape[0]
    y = np.ascontiguousarray(labels, dtype=np.float64)
    if y.shape != (n,):
        raise ValueError(f"solve_dcd: labels must be [N] = [{n}], got {tuple(y.shape)}")
    alpha = np.zeros(n, dtype=np.float64) if alpha is None else np.array(alpha, dtype=np.float64)
    if alpha.shape != (n,):
        raise ValueError(f"solve_dcd: alpha must be [N] = [{n}], got {tuple(alpha.shape)}")
    w, w_bias, sweeps = _dcd(x, y, alpha, float(c_pos), float(c_neg), float(bias_mult), float(tol), int(max_iter), int(seed))
    return w, float(w_bias * bias_mult), alpha, int(sweeps)
