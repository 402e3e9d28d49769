"""Bounding-box regression: per-class ridge regression from pooled conv features to
whitened box targets (SPP-net 4.1 and R-CNN appendix C; ``spp_train_bbox_regressor.m``,
FACTS 1.9).

* features: the pooled SPP vector ("layer 5"), scaled to mean norm 20, with a constant
  bias feature of 1 appended (regularised like the rest);
* samples: windows whose best IoU with a ground-truth box is ``> min_overlap`` (strictly;
  SPP-net 0.5, R-CNN 0.6), ground-truth windows included, each regressed onto that box,
  for that box's class;
* targets (:mod:`spp_detect.box_coder`) centred and whitened:
  ``T = V diag(1 / sqrt(D + 0.001)) V'`` from the eigen-decomposition of their covariance;
  predictions are un-whitened with ``T^-1 = V diag(sqrt(D + 0.001)) V'`` plus the mean;
* ridge penalty ``lambda |W|^2`` with lambda 4,000 (SPP-net; R-CNN 1,000), solved exactly
  in the primal (``(X'X + lambda I) W = X'Y``, ``D + 1`` unknowns) or the dual
  (``W = X' (XX' + lambda I)^-1 Y``, one unknown per sample), whichever system is smaller:
  a class has far fewer samples than the 25,600 dimensions of a pooled feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spp_detect.box_coder import decode_boxes, encode_boxes

__all__ = ["SPP_LAMBDA", "RCNN_LAMBDA", "SPP_MIN_OVERLAP", "RCNN_MIN_OVERLAP", "WHITEN_EPS", "BoxRegressor", "fit_ridge", "fit_box_regressor"]

SPP_LAMBDA: float = 4000.0  # spp_exp_bbox_reg_train_and_test_voc.m (R-CNN: 1000)
RCNN_LAMBDA: float = 1000.0  # rcnn_exp_bbox_reg_train_and_test.m
SPP_MIN_OVERLAP: float = 0.5  # spp_train_bbox_regressor.m:90, O > 0.5
RCNN_MIN_OVERLAP: float = 0.6  # rcnn_train_bbox_regressor.m, O > 0.6
WHITEN_EPS: float = 0.001  # spp_train_bbox_regressor.m:101-109


def fit_ridge(x: Tensor, y: Tensor, lam: float) -> Tensor:
    """``argmin_W |X W - Y|^2 + lam |W|^2`` for ``x Tensor[n, d]`` and ``y Tensor[n, k]``:
    ``Tensor[d, k]``, solved (float64, Cholesky) in the primal when ``d <= n``, else in the
    dual ``W = X' (X X' + lam I)^-1 Y``; both give the same ``W``."""
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    n, d = x.shape
    if d <= n:
        gram = x.T @ x + lam * torch.eye(d, dtype=torch.float64)
        return torch.cholesky_solve(x.T @ y, torch.linalg.cholesky(gram))
    kernel = x @ x.T + lam * torch.eye(n, dtype=torch.float64)
    return x.T @ torch.cholesky_solve(y, torch.linalg.cholesky(kernel))


@dataclass
class BoxRegressor:
    """Per-class linear box regressors.

    Attributes:
        weights: ``Tensor[C, D + 1, 4]`` float32 (last row: the bias feature's weights).
        mean: ``Tensor[C, 4]`` target means; ``unwhiten``: ``Tensor[C, 4, 4]`` (``T^-1``).
        trained: ``Tensor[C]`` bool, classes that had samples (others leave boxes as they are).
        feature_scale: multiplies the pooled features first (to mean norm 20).
    """

    weights: Tensor
    mean: Tensor
    unwhiten: Tensor
    trained: Tensor
    feature_scale: float

    def predict(self, features: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
        """Regressed boxes ``Tensor[N, 4]`` (0-based xyxy, not clipped) of windows ``boxes``
        (``Tensor[N, 4]``) with pooled ``features`` (``Tensor[N, D]``) for classes
        ``labels`` (``Tensor[N]`` int64)."""
        if len(boxes) == 0:
            return boxes.new_zeros((0, 4))
        out = boxes.to(features.dtype).clone()
        for c in labels.unique().tolist():  # one matrix product per class present
            if not bool(self.trained[c]):
                continue  # no samples for this class: boxes stay as they are
            rows = torch.nonzero(labels == c).flatten()
            # [K, D+1] built per class (not for all N at once: N x D floats is ~100 MB per 1,000)
            x = torch.cat([features[rows] * self.feature_scale, features.new_ones((len(rows), 1))], dim=1)
            whitened = x @ self.weights[c].to(x)  # [K, 4]
            deltas = whitened @ self.unwhiten[c].to(x) + self.mean[c].to(x)
            out[rows] = decode_boxes(out[rows], deltas)
        return out

    def to_tensors(self) -> dict[str, Tensor]:
        return {"weights": self.weights, "mean": self.mean, "unwhiten": self.unwhiten, "trained": self.trained,
                "feature_scale": torch.tensor(self.feature_scale)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "BoxRegressor":
        return cls(tensors["weights"], tensors["mean"], tensors["unwhiten"], tensors["trained"].bool(),
                   float(tensors["feature_scale"]))


def fit_box_regressor(
    features: Tensor,
    windows: Tensor,
    targets: Tensor,
    labels: Tensor,
    num_classes: int,
    feature_scale: float,
    lam: float = SPP_LAMBDA,
) -> BoxRegressor:
    """Fit one regressor per class.

    Args:
        features: ``Tensor[N, D]`` pooled features of the training windows (unscaled).
        windows: ``Tensor[N, 4]`` those windows, 0-based xyxy; ``targets``: ``Tensor[N, 4]``
            the ground-truth box each is regressed onto.
        labels: ``Tensor[N]`` int64 class of each sample's ground truth.
        feature_scale: multiplies ``features`` (mean norm 20).
        lam: ridge penalty (:data:`SPP_LAMBDA`, :data:`RCNN_LAMBDA`).
    """
    dim = features.shape[1] + 1
    weights = torch.zeros((num_classes, dim, 4))
    mean = torch.zeros((num_classes, 4))
    unwhiten = torch.eye(4).repeat(num_classes, 1, 1)
    trained = torch.zeros(num_classes, dtype=torch.bool)
    deltas = encode_boxes(windows.to(torch.float64), targets.to(torch.float64))  # [N, 4]
    for c in range(num_classes):
        rows = labels == c
        if int(rows.sum()) < 2:
            continue
        y = deltas[rows]
        mu = y.mean(dim=0)
        centred = y - mu
        cov = centred.T @ centred / len(y)
        eigval, eigvec = torch.linalg.eigh(cov)
        eigval = eigval.clamp(min=0)
        whiten = eigvec @ torch.diag(1 / torch.sqrt(eigval + WHITEN_EPS)) @ eigvec.T
        x = torch.cat([features[rows].to(torch.float64) * feature_scale, torch.ones((len(y), 1), dtype=torch.float64)], 1)
        weights[c] = fit_ridge(x, centred @ whiten, lam).float()
        mean[c] = mu.float()
        unwhiten[c] = (eigvec @ torch.diag(torch.sqrt(eigval + WHITEN_EPS)) @ eigvec.T).float()
        trained[c] = True
    return BoxRegressor(weights, mean, unwhiten, trained, float(feature_scale))
