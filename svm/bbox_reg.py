"""Bounding-box regression: per-class ridge regression from pooled conv features to
whitened box targets (SPP-net 4.1 and R-CNN appendix C; ``spp_train_bbox_regressor.m``,
docs/sources.md 1.9).

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

train-svm gathers the samples in a :class:`BoxSampleStore`: float16 features spilled to one
file per class on disk (the samples grow with the training set: ~38 per image, 51 kB each
at 25,600-d, i.e. ~32 GB for VOC07+12), windows and targets (8 numbers a sample) in memory;
:meth:`BoxSampleStore.fit` solves each class from its file in row blocks, so memory holds
one ``min(n, D + 1)``-square float32 system at a time, never the samples: at most
25,601^2 x 4 bytes = 2.6 GB for pooled SqueezeNet features, whatever the training-set size
(the dual kernel of the largest class before that: 1.1 GB for ~17,000 samples).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spp_detect.box_coder import decode_boxes, encode_boxes

__all__ = ["SPP_LAMBDA", "RCNN_LAMBDA", "SPP_MIN_OVERLAP", "RCNN_MIN_OVERLAP", "WHITEN_EPS", "BoxRegressor", "fit_ridge", "fit_box_regressor",
           "BoxSampleStore"]

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
        mu, whitened, unwhiten[c] = _whitened_targets(deltas[rows])
        ones = torch.ones((int(rows.sum()), 1), dtype=torch.float64)
        x = torch.cat([features[rows].to(torch.float64) * feature_scale, ones], 1)
        weights[c] = fit_ridge(x, whitened, lam).float()
        mean[c] = mu.float()
        trained[c] = True
    return BoxRegressor(weights, mean, unwhiten, trained, float(feature_scale))


def _whitened_targets(deltas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean Tensor[4], whitened Tensor[n, 4] float64, unwhiten Tensor[4, 4] float32)`` of
    one class's ``Tensor[n, 4]`` targets (``spp_train_bbox_regressor.m:101-109``)."""
    mu = deltas.mean(dim=0)
    centred = deltas - mu
    cov = centred.T @ centred / len(deltas)
    eigval, eigvec = torch.linalg.eigh(cov)
    eigval = eigval.clamp(min=0)
    whiten = eigvec @ torch.diag(1 / torch.sqrt(eigval + WHITEN_EPS)) @ eigvec.T
    unwhiten = (eigvec @ torch.diag(torch.sqrt(eigval + WHITEN_EPS)) @ eigvec.T).float()
    return mu, centred @ whiten, unwhiten


class BoxSampleStore:
    """Box-regression samples of a training run, features on disk in float16.

    ``folder`` gets one raw file per class (``class-<c>.f16``, rows of ``dim`` float16
    pooled features, unscaled); windows, targets and counts stay in memory. Made empty
    (any old folder is removed); :meth:`close` deletes it. A checkpoint records
    :meth:`state` (after :meth:`sync`), and :meth:`reopen` takes the folder up again.
    """

    def __init__(self, folder: Path | str, dim: int, num_classes: int) -> None:
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.dim = dim
        self.num_classes = num_classes
        self._windows: list[list[Tensor]] = [[] for _ in range(num_classes)]
        self._targets: list[list[Tensor]] = [[] for _ in range(num_classes)]
        self.counts = [0] * num_classes

    def __len__(self) -> int:
        return sum(self.counts)

    def _path(self, c: int) -> Path:
        return self.folder / f"class-{c}.f16"

    def add(self, features: Tensor, windows: Tensor, targets: Tensor, labels: Tensor) -> None:
        """Append samples: ``features Tensor[K, dim]`` pooled (unscaled), ``windows`` and
        ``targets`` ``Tensor[K, 4]`` 0-based xyxy, ``labels Tensor[K]`` int64 classes."""
        if features.shape[1] != self.dim:
            raise ValueError(f"BoxSampleStore: features must be [K, {self.dim}], got {tuple(features.shape)}")
        half = features.to(torch.float16).numpy()
        for c in labels.unique().tolist():
            rows = (labels == c).numpy()
            with open(self._path(c), "ab") as f:
                f.write(np.ascontiguousarray(half[rows]).tobytes())
            self._windows[c].append(windows[rows].to(torch.float32))
            self._targets[c].append(targets[rows].to(torch.float32))
            self.counts[c] += int(rows.sum())

    def read(self, c: int, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of class ``c``'s samples: ``np.ndarray[k, dim]`` float16,
        read from its file (not mapped: only this block is in memory)."""
        stop = min(stop, self.counts[c])
        if stop <= start:
            return np.zeros((0, self.dim), dtype=np.float16)
        row = 2 * self.dim
        return np.fromfile(self._path(c), dtype=np.float16, count=(stop - start) * self.dim,
                           offset=start * row).reshape(stop - start, self.dim)

    def fit(self, feature_scale: float, lam: float = SPP_LAMBDA, block: int = 1024) -> BoxRegressor:
        """The regressors of :func:`fit_box_regressor` on the stored samples (float16
        features), each class solved by :func:`_ridge_blocks` in ``block``-row blocks."""
        dim = self.dim + 1
        weights = torch.zeros((self.num_classes, dim, 4))
        mean = torch.zeros((self.num_classes, 4))
        unwhiten = torch.eye(4).repeat(self.num_classes, 1, 1)
        trained = torch.zeros(self.num_classes, dtype=torch.bool)
        for c in range(self.num_classes):
            if self.counts[c] < 2:
                continue
            windows, targets = torch.cat(self._windows[c]), torch.cat(self._targets[c])
            deltas = encode_boxes(windows.to(torch.float64), targets.to(torch.float64))
            mu, whitened, unwhiten[c] = _whitened_targets(deltas)
            weights[c] = _ridge_blocks(lambda a, b, c=c: self.read(c, a, b), self.counts[c], self.dim, feature_scale,
                                       whitened, lam, block).float()
            mean[c] = mu.float()
            trained[c] = True
        return BoxRegressor(weights, mean, unwhiten, trained, float(feature_scale))

    def sync(self) -> None:
        """Flush the class files to disk (``fsync``): called before a checkpoint records
        :meth:`state`, so that a crash of the machine cannot leave them shorter than it says."""
        for c in range(self.num_classes):
            if self.counts[c]:
                fd = os.open(self._path(c), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def state(self) -> dict[str, np.ndarray]:
        """What :meth:`reopen` needs besides the class files: ``counts [C]`` int64 and each
        class's ``windows`` / ``targets`` ``[N, 4]`` float32, classes one after the other."""
        def stacked(parts: list[list[Tensor]]) -> np.ndarray:
            flat = [t for c in range(self.num_classes) for t in parts[c]]
            return torch.cat(flat).numpy() if flat else np.zeros((0, 4), dtype=np.float32)

        return {"counts": np.asarray(self.counts, dtype=np.int64), "windows": stacked(self._windows),
                "targets": stacked(self._targets)}

    @classmethod
    def reopen(cls, folder: Path | str, dim: int, num_classes: int, state: dict[str, np.ndarray]) -> "BoxSampleStore":
        """The store whose :meth:`state` was ``state``, over its class files in ``folder``
        (a train-svm run resumed after its first pass); a class file longer than ``state``
        says is cut back to it.

        Raises:
            ValueError: a class file is missing or shorter than ``state`` says.
        """
        store = cls.__new__(cls)
        store.folder, store.dim, store.num_classes = Path(folder), dim, num_classes
        counts = [int(n) for n in np.asarray(state["counts"])]
        if len(counts) != num_classes:
            raise ValueError(f"box-regression samples of {len(counts)} classes, not {num_classes}")
        ends = np.cumsum([0, *counts])
        if len(state["windows"]) != ends[-1] or len(state["targets"]) != ends[-1]:
            raise ValueError("box-regression sample state is inconsistent")
        store.counts = counts
        store._windows = [[torch.from_numpy(np.array(state["windows"][ends[c]:ends[c + 1]], dtype=np.float32))]
                          if counts[c] else [] for c in range(num_classes)]
        store._targets = [[torch.from_numpy(np.array(state["targets"][ends[c]:ends[c + 1]], dtype=np.float32))]
                          if counts[c] else [] for c in range(num_classes)]
        for c in range(num_classes):
            if not counts[c]:
                continue
            path, size = store._path(c), counts[c] * 2 * dim
            if not path.is_file() or path.stat().st_size < size:
                raise ValueError(f"{path} holds fewer box-regression samples than the checkpoint says")
            if path.stat().st_size > size:
                os.truncate(path, size)
        return store

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _ridge_blocks(read: Callable[[int, int], np.ndarray], n: int, d: int, scale: float, y: Tensor, lam: float,
                  block: int) -> Tensor:
    """:func:`fit_ridge` of ``x = [scale * features, 1]`` onto ``y Tensor[n, k]``, the ``n``
    feature rows (``d`` wide) read in ``block``-row blocks by ``read(start, stop) ->
    np.ndarray[b, d]`` (float16 or float32): the primal ``(x'x + lam I) W = x'y`` when
    ``d + 1 <= n``, else the dual ``W = x' (x x' + lam I)^-1 y``. The square system is
    float32 (products, sums and Cholesky; ``lam`` = 4,000 on features of norm 20 keeps it
    well conditioned), the right-hand sides and the result float64: memory is the
    ``min(n, d + 1)``-square float32 system plus two blocks."""
    y = y.to(torch.float64)

    def rows(start: int) -> Tensor:  # [b, d + 1] float32
        part = torch.from_numpy(np.asarray(read(start, start + block), dtype=np.float32)) * scale
        return torch.cat([part, torch.ones((len(part), 1))], dim=1)

    starts = range(0, n, block)
    if d + 1 <= n:
        gram = torch.zeros((d + 1, d + 1), dtype=torch.float32)
        xty = torch.zeros((d + 1, y.shape[1]), dtype=torch.float64)
        for s in starts:
            x = rows(s)
            gram.addmm_(x.T, x)
            xty += x.double().T @ y[s:s + block]
        return _solve_in_place(gram, lam, xty)
    kernel = torch.empty((n, n), dtype=torch.float32)
    for s in starts:
        xs = rows(s)
        for t in starts:
            if t < s:
                continue
            part = xs @ rows(t).T if t != s else xs @ xs.T
            kernel[s:s + block, t:t + block] = part
            kernel[t:t + block, s:s + block] = part.T
    dual = _solve_in_place(kernel, lam, y)  # [n, k]
    del kernel
    out = torch.zeros((d + 1, y.shape[1]), dtype=torch.float64)
    for s in starts:
        out += rows(s).double().T @ dual[s:s + block]
    return out


def _solve_in_place(system: Tensor, lam: float, rhs: Tensor) -> Tensor:
    """``(system + lam I)^-1 rhs`` (float64 ``Tensor[m, k]``) by Cholesky, factorising
    ``system`` (``Tensor[m, m]``, symmetric, float32 or float64) in its own memory (LAPACK
    through SciPy, no second m x m copy)."""
    from scipy.linalg import cho_factor, cho_solve

    system.diagonal().add_(lam)
    factor = cho_factor(system.numpy(), lower=True, overwrite_a=True, check_finite=False)
    solved = cho_solve(factor, rhs.numpy().astype(system.numpy().dtype), check_finite=False)
    return torch.from_numpy(solved).to(torch.float64)
