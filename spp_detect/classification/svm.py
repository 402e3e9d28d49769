"""One linear SVM per class on L2-normalised whole-image features (SPP-net 3.2).

The paper: "we l2-normalize the features and fix the SVM's soft margin parameter C to 1",
no data augmentation. sklearn's ``LinearSVC`` (liblinear: L2-regularised squared hinge,
with a bias) with ``C = 1``. Images whose label for a class is ``0`` (VOC: only difficult
objects of that class) are left out of that class's training, as the devkit leaves them
out of its evaluation.

Classifier file: an ``.npz`` with ``weights float32 [K, D]``, ``bias float32 [K]``,
``classes`` (str ``[K]``) and ``config`` (a JSON string), no pickles.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ClassifierSettings", "LinearClassifier", "l2_normalize", "train_svms", "save_classifier", "load_classifier"]


@dataclass(frozen=True)
class ClassifierSettings:
    """``C``: the soft-margin parameter (paper 3.2: 1). ``max_iter``: liblinear's cap."""

    C: float = field(default=1.0, metadata={"help": "SVM soft margin (paper 3.2: 1)."})
    max_iter: int = 10000


@dataclass
class LinearClassifier:
    """``score(x) = normalize(x) @ weights.T + bias``; ``weights np.ndarray[K, D]``."""

    weights: np.ndarray
    bias: np.ndarray
    classes: tuple[str, ...]
    config: dict[str, object]

    def scores(self, features: np.ndarray) -> np.ndarray:
        """``np.ndarray[N, K]`` float64 SVM scores of ``np.ndarray[N, D]`` raw features."""
        if features.shape[1] != self.weights.shape[1]:
            raise ValueError(f"features have {features.shape[1]} dims, the classifier {self.weights.shape[1]}")
        return l2_normalize(features).astype(np.float64) @ self.weights.T.astype(np.float64) + self.bias


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows of ``np.ndarray[N, D]`` scaled to unit L2 norm (all-zero rows stay zero)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.finfo(np.float32).tiny)


def train_svms(
    features: np.ndarray, labels: np.ndarray, classes: Sequence[str], settings: ClassifierSettings = ClassifierSettings(),
    config: dict[str, object] | None = None,
) -> LinearClassifier:
    """Fit one ``LinearSVC(C)`` per class, positives ``labels == 1`` vs negatives ``-1``.

    Args:
        features: ``np.ndarray[N, D]`` raw (unnormalised) features.
        labels: ``np.ndarray[N, K]`` in ``{1, 0, -1}``; ``0`` rows are left out of that class.

    Raises:
        ValueError: a class has no positive or no negative image.
    """
    from sklearn.svm import LinearSVC

    x = l2_normalize(features.astype(np.float32))
    weights = np.zeros((len(classes), x.shape[1]), dtype=np.float32)
    bias = np.zeros(len(classes), dtype=np.float32)
    for k, name in enumerate(classes):
        keep = labels[:, k] != 0
        y = labels[keep, k] > 0
        if y.all() or not y.any():
            raise ValueError(f"class {name!r}: need positive and negative training images, got {int(y.sum())} of {len(y)}")
        svm = LinearSVC(C=settings.C, max_iter=settings.max_iter, dual=True, random_state=0).fit(x[keep], y)
        weights[k], bias[k] = svm.coef_[0], svm.intercept_[0]
    return LinearClassifier(weights, bias, tuple(classes), {"C": settings.C, **(config or {})})


def save_classifier(path: Path, classifier: LinearClassifier) -> None:
    """Write the classifier ``.npz`` atomically."""
    from spp_detect.stage_dir import atomic_write

    arrays = {
        "weights": classifier.weights,
        "bias": classifier.bias,
        "classes": np.asarray(classifier.classes, dtype=str),
        "config": np.asarray(json.dumps(classifier.config, sort_keys=True, default=str)),
    }
    atomic_write(Path(path), lambda tmp: np.savez(tmp, **arrays))


def load_classifier(path: Path) -> LinearClassifier:
    """Read a classifier ``.npz`` (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return LinearClassifier(
            data["weights"], data["bias"], tuple(str(c) for c in data["classes"]), json.loads(str(data["config"]))
        )
