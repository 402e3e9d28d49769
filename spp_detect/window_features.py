"""Window features for the learners and the detector: pooled SPP vectors, or fc6 / fc7 of a
fine-tuned head computed from them, read from one or several feature caches.

Windows that map to the same cells at the same scale have identical pooled features (the
release deduplicates them too: ``dedup = true`` in ``spp_train.m``'s
``sample_negative_features``); :func:`window_features` pools and runs fc layers once per
distinct ``(scale, cells)`` and copies the result to every window that shares it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spp_detect.cache import CachedImage, FeatureCache
from spp_detect.datasets.registry import class_difference
from spp_detect.device import canonical_device, same_device
from spp_detect.head import FEATURE_LAYERS, SPPHead

__all__ = [
    "open_caches",
    "iter_images",
    "distinct_windows",
    "window_features",
    "window_scores",
    "PoolBuffer",
    "feature_dim",
    "mean_feature_norm",
    "TARGET_NORM",
]

#: Features are scaled so that their mean L2 norm is 20 (``spp_feature_stats.m``,
#: ``spp_scale_features.m``; R-CNN ``rcnn_feature_stats.m``; docs/sources.md 1.7).
TARGET_NORM: float = 20.0
#: The mean norm is estimated on up to 200 random images x 200 random windows, seed fixed
#: (``spp_feature_stats.m:40-41``).
NORM_IMAGES: int = 200
NORM_WINDOWS: int = 200


def open_caches(folders: Sequence[Path | str]) -> list[FeatureCache]:
    """Open one or more extract caches that a stage reads as one training or test set.

    Raises:
        ValueError: no folder given, a cache of images without annotations (no class
            list: nothing to learn from), or caches that cannot be mixed (another
            backbone, pyramid, extract mode, channel count or class list); the message
            names the folders and the difference.
    """
    if not folders:
        raise ValueError("no feature cache given")
    caches = [FeatureCache(f) for f in folders]
    for cache in caches:
        if not cache.classes:
            raise ValueError(f"{cache.folder} holds images without annotations (extract --images alone): "
                             "training needs a labelled dataset (--voc-root, or --coco-json with --images)")
    first = caches[0]
    for other in caches[1:]:
        for attr in ("backbone", "weights", "levels", "mode", "channels"):
            if getattr(other, attr) != getattr(first, attr):
                raise ValueError(
                    f"caches {first.folder} and {other.folder} differ in {attr}: "
                    f"{getattr(first, attr)!r} vs {getattr(other, attr)!r}; they cannot be used together"
                )
        difference = class_difference(first.classes, other.classes)
        if difference is not None:
            raise ValueError(f"caches {first.folder} and {other.folder} have other class lists ({difference} in "
                             f"{other.folder}); they cannot be used together")
    return caches


def iter_images(caches: Sequence[FeatureCache], image_ids: Sequence[tuple[int, str]] | None = None) -> Iterator[CachedImage]:
    """Load ``(cache index, image id)`` pairs (default: every image of every cache, in order)."""
    pairs = image_ids if image_ids is not None else [(i, im) for i, c in enumerate(caches) for im in c.image_ids]
    for index, image_id in pairs:
        yield caches[index].load(image_id)


def distinct_windows(image: CachedImage, indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Group windows that pool identical features (same scale, same cells).

    Args:
        indices: ``Tensor[K]`` window indices (default all).

    Returns:
        ``(first Tensor[U], inverse Tensor[K])``: ``first[u]`` is the smallest index (into
        ``indices``) of the ``u``-th distinct window, and ``indices[k]`` shares the features
        of ``indices[first[inverse[k]]]``.
    """
    if indices is None:
        indices = torch.arange(len(image))
    keys = torch.cat([image.scale_index[indices, None], image.cells[indices]], dim=1)  # [K, 5]
    if len(keys) == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    position = torch.arange(len(keys))
    first = torch.full((int(inverse.max()) + 1,), len(keys), dtype=torch.int64)
    first = first.scatter_reduce(0, inverse, position, reduce="amin")
    return first, inverse


class PoolBuffer:
    """A reusable float32 buffer for the pooled features of one batch of windows.

    Pooling 1,024 windows of 25,600-d features fills 105 MB; allocating that afresh for
    every batch costs as much as pooling it (the pages are faulted in on first write), so
    the detector and the learners pool each batch into the same buffer.
    """

    def __init__(self) -> None:
        self._tensors: dict[torch.dtype, Tensor] = {}

    def get(self, rows: int, dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
        """A ``Tensor[rows, dim]`` of ``dtype`` on ``device`` (contents undefined); one buffer per dtype."""
        device = canonical_device(device)
        t = self._tensors.get(dtype)
        if t is None or t.shape[0] < rows or t.shape[1] != dim or not same_device(t.device, device):
            self._tensors[dtype] = t = torch.empty((max(rows, 1), dim), device=device, dtype=dtype)
        return t[:rows]


def _add_time(timings: dict[str, float] | None, key: str, start: float, device: torch.device | str) -> float:
    """Add the seconds since ``start`` to ``timings[key]`` (after a CUDA sync); the new start."""
    if timings is None:
        return start
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - start
    return now


@torch.inference_mode()
def window_features(
    image: CachedImage,
    layer: str,
    head: SPPHead | None = None,
    indices: Tensor | None = None,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    buffer: PoolBuffer | None = None,
) -> Tensor:
    """Features ``Tensor[K, D]`` (float32, on ``device``) of windows ``indices`` (default all).

    Args:
        layer: ``pool``, ``fc6`` or ``fc7`` (:data:`spp_detect.head.FEATURE_LAYERS`).
        head: the fine-tuned head (needed for ``fc6``/``fc7``), on ``device``.
        batch_size: distinct windows pooled and run through the head at once.
        buffer: where each batch is pooled for the head (default: a new one for this call).
            ``pool`` features are returned whole, so they are pooled straight into the result.
    """
    _check_layer(layer, head)
    if layer == "pool":  # the result is the pooled matrix itself: pool into it directly
        if indices is None:
            indices = torch.arange(len(image))
        first, inverse = distinct_windows(image, indices)
        pooled = image.features(indices[first], device)
        return pooled if _is_identity(inverse) else pooled[inverse.to(device)]
    # a bf16 head (--precision bf16) takes windows pooled straight to bf16
    return _per_window(image, lambda pooled: head.features(pooled, layer, overwrite_input=True).float(),
                       indices, batch_size, device, buffer, feature_dim(image, layer, head), dtype=head.dtype)


@torch.inference_mode()
def window_scores(
    image: CachedImage,
    scorer: Callable[..., Tensor],
    layer: str,
    head: SPPHead | None = None,
    indices: Tensor | None = None,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    buffer: PoolBuffer | None = None,
    timings: dict[str, float] | None = None,
) -> Tensor:
    """Scores ``Tensor[K, S]`` of windows ``indices`` (default all): ``scorer`` applied to
    their ``layer`` features, batch by batch, so that the features of all windows never
    sit in memory at once (``detect``'s path from cached maps to scores).

    Args:
        scorer: ``scorer(features Tensor[B, D], overwrite_input=True) -> Tensor[B, S]``
            (e.g. ``svm.train.SVMModel.scores``); it may scale its input in place.
        timings: when given, seconds are added to its ``pool``, ``fc`` and ``score`` keys.
    """
    _check_layer(layer, head)

    def run(pooled: Tensor) -> Tensor:
        start = time.perf_counter()
        if layer == "pool":
            feats = pooled
        else:
            feats = head.features(pooled, layer, overwrite_input=True).float()
        start = _add_time(timings, "fc", start, device)
        scores = scorer(feats, overwrite_input=True)
        _add_time(timings, "score", start, device)
        return scores

    # a bf16 head (detect --precision bf16) takes windows pooled straight to bf16
    dtype = torch.float32 if layer == "pool" else head.dtype
    return _per_window(image, run, indices, batch_size, device, buffer, None, timings, dtype)


def _check_layer(layer: str, head: SPPHead | None) -> None:
    if layer not in FEATURE_LAYERS:
        raise ValueError(f"unknown feature layer {layer!r}; choose from {FEATURE_LAYERS}")
    if layer != "pool" and head is None:
        raise ValueError(f"features of {layer} need a fine-tuned head")


def _per_window(
    image: CachedImage,
    fn: Callable[[Tensor], Tensor],
    indices: Tensor | None,
    batch_size: int,
    device: torch.device | str,
    buffer: PoolBuffer | None,
    out_dim: int | None,
    timings: dict[str, float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``fn`` of the pooled features of every distinct window, batch by batch (each batch
    pooled into ``buffer``), copied to every window that shares it: ``Tensor[K, out]``."""
    if indices is None:
        indices = torch.arange(len(image))
    first, inverse = distinct_windows(image, indices)  # distinct windows come grouped by scale
    buffer = buffer if buffer is not None else PoolBuffer()
    dim = feature_dim(image, "pool", None)
    parts = []
    for chunk in first.split(batch_size):
        start = time.perf_counter()
        pooled = image.features(indices[chunk], device, out=buffer.get(len(chunk), dim, device, dtype))
        _add_time(timings, "pool", start, device)
        parts.append(fn(pooled))
    if not parts:
        return torch.zeros((0, out_dim or 0), device=device)
    out = torch.cat(parts)
    return out if _is_identity(inverse) else out[inverse.to(device)]


def _is_identity(inverse: Tensor) -> bool:
    """Whether every window is its own distinct window, in order (no copy needed)."""
    return bool(torch.equal(inverse, torch.arange(len(inverse))))


def feature_dim(image_or_cache: CachedImage | FeatureCache, layer: str, head: SPPHead | None) -> int:
    """Length of a ``layer`` feature: the pooled length, or the head's ``fc_dim``."""
    if layer != "pool":
        return head.fc_dim
    return image_or_cache.channels * sum(n * n for n in image_or_cache.levels)


def mean_feature_norm(
    caches: Sequence[FeatureCache],
    layer: str,
    head: SPPHead | None = None,
    seed: int = 0,
    num_images: int = NORM_IMAGES,
    num_windows: int = NORM_WINDOWS,
    device: torch.device | str = "cpu",
) -> float:
    """Mean L2 norm of ``layer`` features over random windows of random training images
    (the release's estimate; features are then scaled by ``TARGET_NORM / mean``)."""
    rng = np.random.default_rng(seed)
    pairs = [(i, im) for i, c in enumerate(caches) for im in c.image_ids]
    if not pairs:
        raise ValueError("the feature caches hold no images")
    chosen = [pairs[int(j)] for j in sorted(rng.choice(len(pairs), min(num_images, len(pairs)), replace=False))]
    norms = []
    for image in iter_images(caches, chosen):
        picks = rng.choice(len(image), min(num_windows, len(image)), replace=False)
        feats = window_features(image, layer, head, torch.from_numpy(np.sort(picks)), device=device)
        norms.append(feats.norm(dim=1).cpu())
    return float(torch.cat(norms).mean())
