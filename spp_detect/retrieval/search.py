"""Search an index: first ranking by MAC or R-MAC, AML re-ranking, query expansion
(Tolias et al., ICLR 2016, sections 3-5; the release's ``test.m``, docs/sources.md 5.1).

* **Query**: the query image cropped to its box (``crop_qim.m``), described like a
  database image; its MAC (L2, not whitened) drives AML.
* **First search**: inner product of unit descriptors, ranked descending.
* **AML re-ranking** of the top ``rerank``: each image is localised
  (:func:`~spp_detect.retrieval.aml.aml_localize`) on its quantised map; the R-MAC of the
  localised box, computed from the quantised map (whitened when the search is), scores it
  against the query, and the top ``rerank`` are re-sorted by that score.
* **Query expansion**: the mean of the query and its top ``qe`` localised vectors scores
  the re-ranked images again (test.m's average QE over the top 1000).

Images below the re-ranked head keep their first-search order and scores.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import torch
from torch import nn

from spp_detect.backbones import Normalization, get_backbone
from spp_detect.retrieval.aml import AMLResult, aml_localize_many
from spp_detect.retrieval.descriptors import crop_query, mac, region_vectors
from spp_detect.image_trunk import load_image_rgb
from spp_detect.retrieval.index import RetrievalIndex, apply_or_normalize, full_res_maps
from spp_detect.retrieval.regions import cells_to_pixels, rmac_regions
from spp_detect.retrieval.whitening import l2_normalize
from spp_detect.stage_dir import Progress, track

__all__ = [
    "METHODS",
    "QueryDescriptor",
    "SearchResult",
    "describe_query",
    "first_search",
    "localize_all",
    "search",
    "run_queries",
]

#: The four pipelines of the paper's tables, in its order.
METHODS = ("mac", "rmac", "rmac+aml", "rmac+aml+qe")


@dataclass(frozen=True)
class QueryDescriptor:
    """A described query: raw ``mac`` ``[C]``, L2-normalised ``regions`` ``[R, C]`` and
    the crop's ``ratio`` (height / width)."""

    mac: np.ndarray
    regions: np.ndarray
    ratio: float

    def vector(self, method: str, index: RetrievalIndex, whiten: bool) -> np.ndarray:
        """The query's unit descriptor ``[D]``, the same recipe as :meth:`RetrievalIndex.descriptors`."""
        white = index.whitening if whiten else None
        if method == "mac":
            return apply_or_normalize(l2_normalize(self.mac), white)
        if method == "rmac":
            return l2_normalize(apply_or_normalize(self.regions, white).sum(0))
        raise ValueError(f"unknown method {method!r}; choose 'mac' or 'rmac'")


def describe_query(
    trunk: nn.Module, norm: Normalization, image: np.ndarray, box: tuple[float, float, float, float] | None,
    levels: int,
) -> QueryDescriptor:
    """Describe ``np.ndarray[H, W, 3]`` uint8 RGB, cropped first to ``box`` (``_query.txt``
    convention, :func:`~spp_detect.retrieval.descriptors.crop_query`) when given."""
    crop = crop_query(image, box) if box is not None else image
    maps = full_res_maps(trunk, norm, crop)
    return QueryDescriptor(mac(maps), region_vectors(maps, levels), crop.shape[0] / crop.shape[1])


def first_search(index: RetrievalIndex, query: QueryDescriptor, method: str, whiten: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(order np.ndarray[N] int64, scores np.ndarray[N] float32)``: database indices by
    descending similarity (stable for ties) and each ranked image's score."""
    scores = index.descriptors(method, whiten) @ query.vector(method, index, whiten)
    order = np.argsort(-scores, kind="stable")
    return order, scores[order]


def localize_all(index: RetrievalIndex, query: QueryDescriptor, images: np.ndarray) -> list[AMLResult]:
    """AML of ``query`` in each database image ``images`` (indices), all in one compiled
    call (:func:`~spp_detect.retrieval.aml.aml_localize_many`, images in parallel)."""
    return aml_localize_many([index.levels(int(i)) for i in images], query.mac, query.ratio)


@numba.njit(cache=True)
def _region_maxima(levels: np.ndarray, x0: int, y0: int, regions: np.ndarray) -> np.ndarray:
    """Per-channel max of ``levels uint8[C, H, W]`` over each half-open cell region
    ``regions int64[R, 4]`` given in the frame of a crop at ``(x0, y0)``: ``float32[R, C]``
    (the values of :func:`~spp_detect.retrieval.descriptors.region_macs` on the crop)."""
    channels = levels.shape[0]
    out = np.zeros((regions.shape[0], channels), dtype=np.float32)
    for r in range(regions.shape[0]):
        x1, y1, x2, y2 = x0 + regions[r, 0], y0 + regions[r, 1], x0 + regions[r, 2], y0 + regions[r, 3]
        for c in range(channels):
            best = np.uint8(0)
            for y in range(y1, y2):
                for x in range(x1, x2):
                    best = max(best, levels[c, y, x])  # branch-free: vectorised along the row
            out[r, c] = best
    return out


def _box_vectors(index: RetrievalIndex, maps: list, boxes: list[AMLResult], whiten: bool) -> np.ndarray:
    """R-MAC ``[K, D]`` of each localised box, from the quantised maps ``maps`` (test.m):
    the box's R-MAC regions maxed by :func:`_region_maxima` (the crop is never copied)."""
    levels_setting = int(index.config.get("levels", 3))
    white = index.whitening if whiten else None
    if not maps:
        return np.zeros((0, index.macs.shape[1]), dtype=np.float32)
    parts = []
    for levels, found in zip(maps, boxes):
        x1, y1, x2, y2 = (int(v) for v in found.box)
        regions = rmac_regions(y2 - y1, x2 - x1, levels_setting)
        array = levels.numpy() if isinstance(levels, torch.Tensor) else np.asarray(levels)
        parts.append(_region_maxima(array, x1, y1, np.ascontiguousarray(regions, dtype=np.int64)))
    starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
    vectors = apply_or_normalize(l2_normalize(np.concatenate(parts)), white)  # [sum R, D], one product for all
    return l2_normalize(np.add.reduceat(vectors, starts, axis=0))


@dataclass
class SearchResult:
    """A ranked list. ``order`` ``[N]`` database indices best first, ``scores`` ``[N]``;
    ``boxes`` maps a re-ranked database index to its localised pixel box
    (``np.ndarray[4]`` float32 0-based xyxy); ``seconds`` times the steps."""

    order: np.ndarray
    scores: np.ndarray
    boxes: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def search(
    index: RetrievalIndex,
    query: QueryDescriptor,
    *,
    method: str = "rmac",
    whiten: bool = True,
    rerank: int = 0,
    qe: int = 0,
    localized: dict[int, AMLResult] | None = None,
) -> SearchResult:
    """Rank the index for one query.

    Args:
        index, query: from :func:`~spp_detect.retrieval.index.load_index` and :func:`describe_query`.
        method: ``"mac"`` or ``"rmac"`` for the first search.
        whiten: use the index's PCA-whitening.
        rerank: AML re-ranking of the top N (0: none). The re-scoring uses R-MAC of the box.
        qe: average query expansion with the top ``qe`` localised images (needs ``rerank``).
        localized: cache of AML results by database index (filled and reused; AML does not
            depend on ``method`` or ``whiten``).

    Returns:
        :class:`SearchResult`.
    """
    if qe and not rerank:
        raise ValueError("query expansion uses the localised vectors: give rerank > 0 too")
    start = time.perf_counter()
    order, scores = first_search(index, query, method, whiten)
    result = SearchResult(order, scores, seconds={"search": time.perf_counter() - start})
    if not rerank:
        return result
    top = order[:rerank]
    cache = localized if localized is not None else {}
    start = time.perf_counter()
    maps = [index.levels(int(i)) for i in top]  # read once: AML and the box vectors
    missing = [k for k, i in enumerate(top) if int(i) not in cache]
    cache.update(zip((int(top[k]) for k in missing),
                     aml_localize_many([maps[k] for k in missing], query.mac, query.ratio)))
    found = [cache[int(i)] for i in top]
    vectors = _box_vectors(index, maps, found, whiten)  # [K, D]
    query_vector = query.vector("rmac", index, whiten)
    head_scores = vectors @ query_vector
    head = np.argsort(-head_scores, kind="stable")
    result.seconds["aml"] = time.perf_counter() - start
    if qe:
        expanded = np.concatenate([vectors[head[:qe]], query_vector[None]]).mean(0)
        head_scores = vectors @ expanded
        head = np.argsort(-head_scores, kind="stable")
    result.order = np.concatenate([top[head], order[rerank:]])
    result.scores = np.concatenate([head_scores[head], scores[rerank:]]).astype(np.float32)
    spec = get_backbone(str(index.config["backbone"]))
    for i, found_i in zip(top, found):
        width, height = (int(v) for v in index.sizes[int(i)])
        result.boxes[int(i)] = cells_to_pixels(found_i.box[None], spec.stride, spec.offset, width, height)[0]
    return result


def run_queries(
    index: RetrievalIndex,
    trunk: nn.Module,
    norm: Normalization,
    queries: Sequence[tuple[Path, tuple[float, float, float, float] | None]],
    *,
    whiten: bool = True,
    rerank: int = 100,
    qe: int = 5,
    progress: Progress | None = None,
) -> dict[str, list[np.ndarray]]:
    """Rank the index for each ``(image file, box)`` query with the four :data:`METHODS`
    (AML re-ranks the top ``rerank`` of R-MAC; QE averages the top ``qe``); AML runs once
    per query and image. Returns method -> one ranking ``np.ndarray[N]`` per query."""
    levels = int(index.config.get("levels", 3))
    rankings: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    for path, box in track(progress, queries, "queries"):
        described = describe_query(trunk, norm, load_image_rgb(path), box, levels)
        localized: dict[int, AMLResult] = {}
        rankings["mac"].append(search(index, described, method="mac", whiten=whiten).order)
        rankings["rmac"].append(search(index, described, method="rmac", whiten=whiten).order)
        rankings["rmac+aml"].append(search(index, described, whiten=whiten, rerank=rerank, localized=localized).order)
        rankings["rmac+aml+qe"].append(
            search(index, described, whiten=whiten, rerank=rerank, qe=qe, localized=localized).order)
    return rankings
