"""Hard-negative mining for one class: which negatives enter the cache, and which leave.

The release's rules (``spp_train.m:137, 446-451``; R-CNN ``rcnn_train.m``; docs/sources.md 1.7):

* negatives are windows whose IoU with every box of the class is below 0.3
  (``neg_ovr_threshs = [-1, 0.3)``);
* on the first image every negative is added; later, only those the current model scores
  above ``-1.0001`` (``hard_thresh``) and not already cached;
* the class's SVM is retrained once more than 2,000 negatives were added since its last
  training (``retrain_limit``), and at the last image;
* after each retraining, cached negatives scoring below ``-1.2`` are evicted
  (``evict_thresh``; fast-rcnn's Python port used -1.1);
* one pass over the images (``max_hard_epochs = 1``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NEGATIVE_IOU", "HARD_THRESHOLD", "EVICT_THRESHOLD", "RETRAIN_LIMIT", "NegativeCache"]

NEGATIVE_IOU: float = 0.3  # Script_spp_voc.m:49, neg_ovr_threshs = {[-1, 0.3]}, strict <
HARD_THRESHOLD: float = -1.0001  # spp_train.m, hard_thresh
EVICT_THRESHOLD: float = -1.2  # spp_train.m, evict_thresh
RETRAIN_LIMIT: int = 2000  # spp_train.m, retrain_limit


class NegativeCache:
    """The cached negatives of one class: ``keys Tensor[Q]`` int64 (unique window ids; the
    features are rows of the shared :class:`svm.feature_store.HalfStore`) and ``alphas
    Tensor[Q]`` float64 (each negative's dual variable in the last solve, 0 for new ones:
    the solver's warm start), in insertion order, plus the count added since the last
    retraining."""

    def __init__(self, retrain_limit: int = RETRAIN_LIMIT) -> None:
        self.retrain_limit = retrain_limit
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.alphas = torch.zeros(0, dtype=torch.float64)
        self.num_added = 0

    def __len__(self) -> int:
        return int(self.keys.numel())

    def offer(self, keys: Tensor, scores: Tensor | None, threshold: float = HARD_THRESHOLD) -> Tensor:
        """Add the candidates (``keys Tensor[K]``) whose score (``Tensor[K]``) is
        ``> threshold`` and whose key is not cached yet; all new keys when ``scores`` is None
        (the first image). Returns ``Tensor[K]`` bool: which candidates were added."""
        keep = ~torch.isin(keys, self.keys)
        if scores is not None:
            keep &= scores > threshold
        added = int(keep.sum())
        if added:
            self.keys = torch.cat([self.keys, keys[keep]])
            self.alphas = torch.cat([self.alphas, torch.zeros(added, dtype=torch.float64)])
            self.num_added += added
        return keep

    def needs_retraining(self) -> bool:
        """More than ``retrain_limit`` negatives were added since the last retraining."""
        return self.num_added > self.retrain_limit

    def retrained(self, scores: Tensor, threshold: float = EVICT_THRESHOLD) -> int:
        """After retraining: evict negatives whose new score (``Tensor[Q]``, in cache order)
        is ``< threshold`` and reset the added count. Returns how many were evicted."""
        keep = scores >= threshold
        evicted = int((~keep).sum())
        self.keys = self.keys[keep]
        self.alphas = self.alphas[keep]
        self.num_added = 0
        return evicted
