"""One linear SVM per class, as R-CNN and SPP-net train them.

liblinear ``-s 3`` (L2-regularised, L1-loss (hinge) SVM, dual solver), ``-c 0.001``,
``-w1 2`` (positive loss weight), ``-B 10`` (a bias feature of 10, so the bias is
regularised too): ``spp_train.m:43-45, 312, 335`` and R-CNN ``rcnn_train.m`` (FACTS 1.7,
2). scikit-learn's ``LinearSVC(loss="hinge", dual=True, intercept_scaling=10)`` is the
same liblinear solver; fast-rcnn's ``tools/train_svms.py`` uses it the same way. The
class weight is derived from :data:`POS_WEIGHT` so the two cannot drift apart.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

__all__ = ["SVM_C", "POS_WEIGHT", "BIAS_MULT", "LIBLINEAR_TOL", "train_linear_svm", "svm_objective"]

SVM_C: float = 1e-3  # liblinear -c 0.001 (spp_train.m)
POS_WEIGHT: float = 2.0  # liblinear -w1 2 (spp_train.m, pos_loss_weight)
BIAS_MULT: float = 10.0  # liblinear -B 10 (spp_train.m, bias_mult)
#: Stopping tolerance: the release passes no -e, so liblinear's default for -s 3 applies
#: (dual maximal violation <= 0.1); scikit-learn's own default (1e-4) solves far longer.
LIBLINEAR_TOL: float = 0.1


def train_linear_svm(
    positives: Tensor,
    negatives: Tensor,
    C: float = SVM_C,
    pos_weight: float = POS_WEIGHT,
    bias_mult: float = BIAS_MULT,
    max_iter: int = 1000,
    tol: float = LIBLINEAR_TOL,
) -> tuple[Tensor, float]:
    """Fit ``score = w . x + b`` separating ``positives`` (``Tensor[P, D]``) from
    ``negatives`` (``Tensor[Q, D]``).

    Returns:
        ``(w Tensor[D] float32, b float)``; ``b`` is the learned bias-feature weight times
        ``bias_mult`` (``b = w(end) * bias_mult`` in the release).

    Raises:
        ValueError: no positives or no negatives.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError(f"an SVM needs positives and negatives, got {len(positives)} and {len(negatives)}")
    x = torch.cat([positives, negatives]).to("cpu", torch.float64).numpy()
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


def svm_objective(
    w: Tensor, b: float, positives: Tensor, negatives: Tensor, C: float = SVM_C, pos_weight: float = POS_WEIGHT,
    bias_mult: float = BIAS_MULT,
) -> float:
    """The release's logged objective: ``C w1 sum hinge(pos) + C sum hinge(neg) + |w|^2 / 2
    + (b / B)^2 / 2`` (``spp_train.m``)."""
    pos_loss = torch.clamp(1 - (positives @ w + b), min=0).sum()
    neg_loss = torch.clamp(1 + (negatives @ w + b), min=0).sum()
    return float(C * pos_weight * pos_loss + C * neg_loss + 0.5 * w.dot(w) + 0.5 * (b / bias_mult) ** 2)
