"""PCA-whitening of descriptors, learned on one dataset and applied to another
(Tolias et al., ICLR 2016, section 3; the release's ``yael_pca`` + ``apply_whiten.m``,
docs/sources.md 5.1).

``x -> P (x - m)`` with ``m`` the mean of the learning vectors and
``P = diag(eigval^-1/2) eigvec^T`` from the eigen-decomposition of their covariance,
eigenvalues in descending order, **no dimensionality reduction**; callers L2-normalise
the result (:func:`apply_whitening` does). Eigenvalues are floored at ``1e-9`` times the
largest so that channels that never fire on the learning set (dead ReLUs) do not divide
by zero; the release has no such floor (its VGG16 has no dead conv5_3 channels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Whitening", "learn_pca_whitening", "apply_whitening", "l2_normalize"]

_EIG_FLOOR = 1e-9


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x / ||x||`` along ``axis``; all-zero vectors stay zero (the release's NaN -> 0)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


@dataclass(frozen=True)
class Whitening:
    """A learned PCA-whitening: ``mean`` ``[D]``, ``projection`` ``[D, D]`` (rows are the
    whitened axes), ``eigenvalues`` ``[D]`` descending, ``num_vectors`` learned on."""

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray
    num_vectors: int

    def save(self, path: Path) -> None:
        """Write to ``path`` (npz, no pickles)."""
        np.savez(path, mean=self.mean, projection=self.projection, eigenvalues=self.eigenvalues,
                 num_vectors=np.int64(self.num_vectors))

    @classmethod
    def load(cls, path: Path) -> Whitening:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["mean"], data["projection"], data["eigenvalues"], int(data["num_vectors"]))


def learn_pca_whitening(vectors: np.ndarray) -> Whitening:
    """Learn PCA-whitening from ``np.ndarray[N, D]`` vectors (N >= 2)."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"learn_pca_whitening: expected [N >= 2, D] vectors, got shape {x.shape}")
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False, bias=False).reshape(x.shape[1], x.shape[1])
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    floored = np.maximum(eigval, _EIG_FLOOR * max(float(eigval[0]), 1e-300))
    projection = (eigvec / np.sqrt(floored)).T  # diag(eigval^-1/2) eigvec^T
    return Whitening(mean.astype(np.float32), projection.astype(np.float32), eigval.astype(np.float32), len(x))


def apply_whitening(vectors: np.ndarray, whitening: Whitening) -> np.ndarray:
    """Whiten ``np.ndarray[N, D]`` (or ``[D]``) and L2-normalise each row (float32)."""
    x = np.asarray(vectors, dtype=np.float32)
    return l2_normalize((x - whitening.mean) @ whitening.projection.T)
