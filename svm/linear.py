"""One linear SVM per class, as R-CNN and SPP-net train them.

liblinear ``-s 3`` (L2-regularised, L1-loss (hinge) SVM, dual solver), ``-c 0.001``,
``-w1 2`` (positive loss weight), ``-B 10`` (a bias feature of 10, so the bias is
regularised too): ``spp_train.m:43-45, 312, 335`` and R-CNN ``rcnn_train.m`` (docs/sources.md 1.7,
2.1). scikit-learn's ``LinearSVC(loss="hinge", dual=True, intercept_scaling=10)`` is the
same liblinear solver; fast-rcnn's ``tools/train_svms.py`` uses it the same way. The
class weight is derived from :data:`POS_WEIGHT` so the two cannot drift apart.

Two solvers of that same problem (:data:`SOLVERS`): ``"dcd"`` (the default), liblinear's
dual coordinate descent compiled here (:mod:`svm.dcd`) on the float16 examples of the
mining caches, warm-started across the retrains of a class; and ``"liblinear"``,
scikit-learn's ``LinearSVC`` (float64 copies), kept for comparison. Both stop by
liblinear's rule (projected-gradient spread <= tol); train-svm's tolerance is
:data:`SVM_TOL` = 0.01, ten times tighter than the release's :data:`LIBLINEAR_TOL`.

``C``: the release's 0.001 balances hinge loss and regulariser for VOC2007 trainval's
5,011 images; the loss term is a sum over examples, so :func:`auto_c` keeps that balance
for any training-set size: ``C = 0.001 * 5011 / images``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

__all__ = ["SVM_C", "RELEASE_IMAGES", "POS_WEIGHT", "BIAS_MULT", "LIBLINEAR_TOL", "SVM_TOL", "SOLVERS", "auto_c", "train_linear_svm",
           "linear_scores", "svm_objective", "objective_from_scores"]

SVM_C: float = 1e-3  # liblinear -c 0.001 (spp_train.m)
POS_WEIGHT: float = 2.0  # liblinear -w1 2 (spp_train.m, pos_loss_weight)
BIAS_MULT: float = 10.0  # liblinear -B 10 (spp_train.m, bias_mult)
#: Stopping tolerance: the release passes no -e, so liblinear's default for -s 3 applies
#: (dual maximal violation <= 0.1); scikit-learn's own default (1e-4) solves far longer.
LIBLINEAR_TOL: float = 0.1
#: train-svm's default tolerance (``SVMSettings.tol``; ``--tol 0.1`` is the release's rule).
#: At 0.1 both solvers stop far from the optimum, each somewhere else: on the same final
#: problems the objectives of dcd and LinearSVC differed by a factor 0.6-1.8 per class
#: (bench.train_scale, solver_objective); at 0.01 dcd lands below LinearSVC-at-0.1 on every
#: class, at about twice the sweeps of 0.1.
SVM_TOL: float = 0.01
#: VOC2007 trainval, the set the release's C = 0.001 was chosen on (Script_spp_voc.m trains
#: on voc_2007_trainval: 5,011 images, docs/sources.md 1.7).
RELEASE_IMAGES: int = 5011
#: ``"dcd"``: :mod:`svm.dcd` (compiled, warm start); ``"liblinear"``: scikit-learn's LinearSVC.
SOLVERS: tuple[str, ...] = ("dcd", "liblinear")


def auto_c(num_images: int, c: float = SVM_C, images: int = RELEASE_IMAGES) -> float:
    """The release's C rescaled to ``num_images`` training images: ``c * images / num_images``
    (0.001 x 5,011 / n), so hinge loss and regulariser keep the release's balance."""
    if num_images < 1:
        raise ValueError(f"auto_c: needs at least one training image, got {num_images}")
    return c * images / num_images


def train_linear_svm(
    positives: Tensor,
    negatives: Tensor,
    C: float = SVM_C,
    pos_weight: float = POS_WEIGHT,
    bias_mult: float = BIAS_MULT,
    max_iter: int = 1000,
    tol: float = LIBLINEAR_TOL,
    solver: str = "dcd",
) -> tuple[Tensor, float]:
    """Fit ``score = w . x + b`` separating ``positives`` (``Tensor[P, D]``) from
    ``negatives`` (``Tensor[Q, D]``), from scratch, with ``solver`` (:data:`SOLVERS`;
    ``"dcd"`` rounds the examples to float16 first, as the mining caches store them).

    Returns:
        ``(w Tensor[D] float32, b float)``; ``b`` is the learned bias-feature weight times
        ``bias_mult`` (``b = w(end) * bias_mult`` in the release).

    Raises:
        ValueError: no positives or no negatives, or an unknown solver.
    """
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError(f"an SVM needs positives and negatives, got {len(positives)} and {len(negatives)}")
    if solver == "dcd":
        from svm.dcd import solve_dcd

        x = torch.cat([positives.to(torch.float16), negatives.to(torch.float16)]).numpy()
        y = np.concatenate([np.ones(len(positives)), -np.ones(len(negatives))])
        w, b, _, _ = solve_dcd(x, y, C * pos_weight, C, bias_mult, tol, max_iter=max_iter)
        return torch.from_numpy(w.astype(np.float32)), b
    if solver != "liblinear":
        raise ValueError(f"unknown SVM solver {solver!r}; choose from {SOLVERS}")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    x = torch.cat([positives.to(torch.float64), negatives.to(torch.float64)]).numpy()
    y = np.concatenate([np.ones(len(positives)), -np.ones(len(negatives))])
    model = LinearSVC(
        C=C,
        loss="hinge",
        dual=True,
        class_weight={1: pos_weight, -1: 1.0},
        fit_intercept=True,
        intercept_scaling=bias_mult,
        max_iter=max_iter,
        tol=tol,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return torch.from_numpy(model.coef_[0].astype(np.float32)), float(model.intercept_[0])


def linear_scores(features: Tensor, w: Tensor, b: float, chunk: int = 4096) -> Tensor:
    """``Tensor[N]`` float32 scores ``features @ w + b`` of ``Tensor[N, D]`` features of any
    float dtype (float16 caches are widened ``chunk`` rows at a time)."""
    w = w.to(torch.float32)
    out = torch.empty(len(features), dtype=torch.float32)
    for start in range(0, len(features), chunk):
        out[start:start + chunk] = features[start:start + chunk].to(torch.float32) @ w + b
    return out


def svm_objective(
    w: Tensor, b: float, positives: Tensor, negatives: Tensor, C: float = SVM_C, pos_weight: float = POS_WEIGHT,
    bias_mult: float = BIAS_MULT,
) -> float:
    """The release's logged objective (:func:`objective_from_scores`) of ``score = w . x + b``
    on ``positives`` and ``negatives`` (features of any float dtype)."""
    scores = torch.cat([linear_scores(positives, w, b), linear_scores(negatives, w, b)]).double().numpy()
    labels = np.concatenate([np.ones(len(positives)), -np.ones(len(negatives))])
    return objective_from_scores(scores, labels, w.double().numpy(), b, C, pos_weight, bias_mult)


def objective_from_scores(
    scores: np.ndarray, labels: np.ndarray, w: np.ndarray, b: float, C: float = SVM_C, pos_weight: float = POS_WEIGHT,
    bias_mult: float = BIAS_MULT,
) -> float:
    """The release's logged objective ``C w1 sum hinge(pos) + C sum hinge(neg) + |w|^2 / 2
    + (b / B)^2 / 2`` (``spp_train.m``) from the examples' scores (``np.ndarray[N]``) and
    labels (+1 / -1), in float64 sums."""
    hinge = np.maximum(0.0, 1.0 - labels * np.asarray(scores, dtype=np.float64))
    w = np.asarray(w, dtype=np.float64)
    return float(C * (pos_weight * hinge[labels > 0].sum() + hinge[labels < 0].sum()) + 0.5 * w @ w
                 + 0.5 * (b / bias_mult) ** 2)
