"""Selective search's hierarchical grouping, and the paper's ranking of its boxes.

Uijlings et al., "Selective Search for Object Recognition", IJCV 2013 (section 3) and
their MATLAB toolbox (``Image2HierarchicalGrouping.m``), as OpenCV's
``ximgproc/src/selectivesearchsegmentation.cpp`` re-implements it. OpenCV's own
``process()`` hides the hierarchy and ranks boxes upside down (docs/sources.md 1.11), so the grouping
is built here from OpenCV's Felzenszwalb segmentation and ranked as the paper says.

One hierarchy = one colour-space image x one Felzenszwalb ``k`` x one similarity strategy:

1. initial segments: ``cv2.ximgproc.segmentation.createGraphSegmentation(sigma, k,
   min_size).processImage(image)`` (Felzenszwalb & Huttenlocher 2004);
2. per region: colour histogram (25 bins per channel), texture histogram (Gaussian
   derivatives, sigma 1, 8 orientations per channel x 10 bins), both L1-normalised over
   the whole vector; size in pixels; bounding box (IJCV 2013 section 3.2);
3. greedy merging: the most similar pair of neighbouring regions is merged into a new
   region (histograms averaged weighted by size, bounding boxes united, neighbours
   united) until one region is left; similarity = sum of the strategy's terms
   ``s_colour = sum(min(C_i, C_j))``, ``s_texture = sum(min(T_i, T_j))``,
   ``s_size = 1 - (size_i + size_j) / size_im``,
   ``s_fill = 1 - (size_BB_ij - size_i - size_j) / size_im`` (IJCV 2013 section 3.2).

Ranking (:func:`rank_hierarchy_boxes`, docs/sources.md 1.11; Uijlings' ``Image2HierarchicalGrouping.m``
and R-CNN's ``selective_search_boxes.m``; IJCV 2013 section 5): a hierarchy's boxes are
``[initial segments; merged regions in merge order]`` with priorities ``N, N-1, ..., 1``
(``priority = (size(boxes, 1):-1:1)'``), so the last merge (the whole image) has priority
1 and the initial segments the largest ones; every priority is multiplied by a uniform
random number and all hierarchies of an image are sorted together, ascending. Regions
high in a hierarchy therefore tend to come first, with a random factor that mixes the
hierarchies.

Boxes are ``np.ndarray[N, 4]`` float32, 0-based continuous ``(x1, y1, x2, y2)`` image
pixels (:mod:`spp_detect.boxes`): a region whose pixels span columns ``a .. b`` has
``x1 = a``, ``x2 = b + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

__all__ = [
    "COLOUR_BINS",
    "TEXTURE_BINS",
    "TEXTURE_ORIENTATIONS",
    "STRATEGIES",
    "RegionFeatures",
    "colour_bin_image",
    "texture_bin_image",
    "segment",
    "region_features",
    "hierarchical_grouping",
    "hierarchy_boxes",
    "hierarchy_priorities",
    "rank_hierarchy_boxes",
]

#: IJCV 2013 section 3.2 (and ``BlobStructColourHist.m``): 25 bins per colour channel.
COLOUR_BINS = 25
#: IJCV 2013 section 3.2: Gaussian derivatives in 8 orientations, sigma = 1, 10 bins each.
TEXTURE_ORIENTATIONS = 8
TEXTURE_BINS = 10
TEXTURE_SIGMA = 1.0

#: Similarity strategies as (colour, texture, size, fill) switches; IJCV 2013 section 3.2,
#: R-CNN ``selective_search_boxes.m`` names (``ColourTextureSizeFill``, ``TextureSizeFill``,
#: and the quality mode's ``BoxFill``, ``Size``).
STRATEGIES: dict[str, tuple[bool, bool, bool, bool]] = {
    "colour+texture+size+fill": (True, True, True, True),
    "texture+size+fill": (False, True, True, True),
    "fill": (False, False, False, True),
    "size": (False, False, True, False),
}


@dataclass(frozen=True)
class RegionFeatures:
    """The initial regions of one segmentation.

    Attributes:
        colour: ``np.ndarray[n, 25 * C]`` float64, L1-normalised colour histograms.
        texture: ``np.ndarray[n, 80 * C]`` float64, L1-normalised texture histograms.
        sizes: ``np.ndarray[n]`` float64, pixels per region.
        bounds: ``np.ndarray[n, 4]`` int64, inclusive pixel bounds ``(x_min, y_min, x_max, y_max)``.
        pairs: ``np.ndarray[P, 2]`` int64, neighbouring regions ``(i, j)``, ``i < j``,
            4-connectivity, sorted by ``(i, j)``.
        image_size: pixels in the image.
    """

    colour: np.ndarray
    texture: np.ndarray
    sizes: np.ndarray
    bounds: np.ndarray
    pairs: np.ndarray
    image_size: int

    @property
    def num_regions(self) -> int:
        return len(self.sizes)


def colour_bin_image(image: np.ndarray, ranges: tuple[int, ...]) -> np.ndarray:
    """Per-pixel colour histogram bin, offset per channel.

    Args:
        image: ``np.ndarray[H, W, C]`` uint8 colour-space image.
        ranges: per channel, the number of values it takes (256, or 180 for OpenCV's 8-bit
            hue), split into :data:`COLOUR_BINS` equal bins.

    Returns:
        ``np.ndarray[H, W, C]`` int16, bin ``c * 25 + b`` of channel ``c``.
    """
    values = image.astype(np.int16)  # [H, W, C]; 255 * 25 fits
    span = np.asarray(ranges, dtype=np.int16)
    bins = np.minimum(values * np.int16(COLOUR_BINS) // span, COLOUR_BINS - 1)
    return (bins + np.arange(image.shape[2], dtype=np.int16) * COLOUR_BINS).astype(np.int16)


def texture_bin_image(image: np.ndarray) -> np.ndarray:
    """Per-pixel texture histogram bin per channel and orientation, offset.

    Gaussian derivatives with sigma = 1 (IJCV 2013 section 3.2) along 0, 45, 90 and 135
    degrees; the positive and negative half of each are the 8 orientations (as OpenCV's
    texture strategy splits them). Each orientation map is scaled by its maximum over the
    image to ``[0, 1]`` and cut into :data:`TEXTURE_BINS` bins.

    Args:
        image: ``np.ndarray[H, W, C]`` uint8 colour-space image.

    Returns:
        ``np.ndarray[H, W, 8 * C]`` int16, bin ``(c * 8 + o) * 10 + b``.
    """
    import cv2

    height, width, channels = image.shape
    radius = int(np.ceil(3 * TEXTURE_SIGMA))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    gauss = np.exp(-(x**2) / (2 * TEXTURE_SIGMA**2))
    gauss /= gauss.sum()
    deriv = -x / TEXTURE_SIGMA**2 * gauss  # d/dx of the Gaussian
    out = np.empty((height, width, channels * TEXTURE_ORIENTATIONS), dtype=np.int16)
    for c in range(channels):  # 1-5 channels, whole-image filters
        plane = image[:, :, c].astype(np.float32)
        dx = cv2.sepFilter2D(plane, cv2.CV_32F, deriv, gauss, borderType=cv2.BORDER_REFLECT)
        dy = cv2.sepFilter2D(plane, cv2.CV_32F, gauss, deriv, borderType=cv2.BORDER_REFLECT)
        _orientation_bins(dx, dy, out, c * TEXTURE_ORIENTATIONS, TEXTURE_BINS)
    return out


@numba.njit(cache=True)
def _orientation_bins(dx, dy, out, first, num_bins):  # pragma: no cover - compiled
    """Write bins of the 8 half-wave directional derivatives into ``out[:, :, first:first + 8]``.

    Orientation ``o = 2 d + s``: direction ``d`` in (0, 45, 90, 135) degrees
    (``dx``, ``(dx + dy) / sqrt 2``, ``dy``, ``(dy - dx) / sqrt 2``), ``s = 0`` the positive
    half, ``s = 1`` the negative half; each scaled by its image maximum to ``num_bins`` bins.
    """
    height, width = dx.shape
    half = np.float32(np.sqrt(0.5))
    top = np.zeros(8, dtype=np.float32)
    for y in range(height):
        for x in range(width):
            gx, gy = dx[y, x], dy[y, x]
            responses = (gx, (gx + gy) * half, gy, (gy - gx) * half)
            for d in range(4):
                r = responses[d]
                top[2 * d] = max(top[2 * d], r)
                top[2 * d + 1] = max(top[2 * d + 1], -r)
    gain = np.zeros(8, dtype=np.float32)
    for o in range(8):
        if top[o] > 0:
            gain[o] = np.float32(num_bins / np.float64(top[o]))
    for y in range(height):
        for x in range(width):
            gx, gy = dx[y, x], dy[y, x]
            responses = (gx, (gx + gy) * half, gy, (gy - gx) * half)
            for d in range(4):
                r = responses[d]
                for sgn in range(2):
                    o = 2 * d + sgn
                    v = max(r, np.float32(0.0)) if sgn == 0 else max(-r, np.float32(0.0))
                    b = min(int(v * gain[o]), num_bins - 1)
                    out[y, x, first + o] = (first + o) * num_bins + b


def segment(image: np.ndarray, sigma: float, k: float, min_size: int) -> np.ndarray:
    """Felzenszwalb-Huttenlocher initial segments (OpenCV's implementation).

    Args:
        image: ``np.ndarray[H, W, C]`` uint8 colour-space image.

    Returns:
        ``np.ndarray[H, W]`` int64 labels ``0 .. n-1``.
    """
    import cv2

    segmenter = cv2.ximgproc.segmentation.createGraphSegmentation(float(sigma), float(k), int(min_size))
    return segmenter.processImage(np.ascontiguousarray(image)).astype(np.int64)


def region_features(labels: np.ndarray, colour_bins: np.ndarray, texture_bins: np.ndarray) -> RegionFeatures:
    """Histograms, sizes, bounds and neighbours of the initial regions (no per-pixel loop).

    Args:
        labels: ``np.ndarray[H, W]`` int labels ``>= 0``; gaps are renumbered away.
        colour_bins: ``np.ndarray[H, W, C]`` from :func:`colour_bin_image`.
        texture_bins: ``np.ndarray[H, W, 8C]`` from :func:`texture_bin_image`.
    """
    height, width = labels.shape
    flat = labels.reshape(-1)
    n = int(flat.max()) + 1
    sizes = np.bincount(flat, minlength=n).astype(np.float64)  # [n]
    if (sizes == 0).any():  # labels with gaps (OpenCV's are contiguous): renumber 0 .. n-1
        _, inverse = np.unique(flat, return_inverse=True)
        labels = inverse.reshape(height, width)
        return region_features(labels, colour_bins, texture_bins)
    colour = _histograms(flat, colour_bins.reshape(len(flat), -1), n, COLOUR_BINS * colour_bins.shape[2])
    texture = _histograms(flat, texture_bins.reshape(len(flat), -1), n, TEXTURE_BINS * texture_bins.shape[2])
    bounds = _region_bounds(np.ascontiguousarray(labels), n)
    left, right = labels[:, :-1].reshape(-1), labels[:, 1:].reshape(-1)
    up, down = labels[:-1, :].reshape(-1), labels[1:, :].reshape(-1)
    a = np.concatenate([left, up])
    b = np.concatenate([right, down])
    differ = a != b
    lo, hi = np.minimum(a[differ], b[differ]), np.maximum(a[differ], b[differ])
    codes = np.unique(lo * n + hi)  # sorted by (i, j)
    pairs = np.stack([codes // n, codes % n], axis=1).astype(np.int64)  # [P, 2]
    return RegionFeatures(colour, texture, sizes, bounds, pairs, height * width)


def _histograms(flat_labels: np.ndarray, bins: np.ndarray, n: int, dims: int) -> np.ndarray:
    """``np.ndarray[n, dims]`` float64 L1-normalised histograms; ``bins`` is ``[HW, G]``, one bin per group."""
    counts = _count_bins(np.ascontiguousarray(flat_labels), np.ascontiguousarray(bins), n, dims)
    return counts / counts.sum(axis=1, keepdims=True)


@numba.njit(cache=True)
def _count_bins(flat_labels, bins, n, dims):  # pragma: no cover - compiled
    counts = np.zeros((n, dims))
    for p in range(flat_labels.shape[0]):
        r = flat_labels[p]
        for g in range(bins.shape[1]):
            counts[r, bins[p, g]] += 1.0
    return counts


@numba.njit(cache=True)
def _region_bounds(labels, n):  # pragma: no cover - compiled
    bounds = np.empty((n, 4), dtype=np.int64)
    bounds[:, 0] = labels.shape[1]
    bounds[:, 1] = labels.shape[0]
    bounds[:, 2] = -1
    bounds[:, 3] = -1
    for y in range(labels.shape[0]):
        for x in range(labels.shape[1]):
            r = labels[y, x]
            bounds[r, 0] = min(bounds[r, 0], x)
            bounds[r, 1] = min(bounds[r, 1], y)
            bounds[r, 2] = max(bounds[r, 2], x)
            bounds[r, 3] = max(bounds[r, 3], y)
    return bounds


def hierarchical_grouping(features: RegionFeatures, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """Greedy merging of the most similar neighbours until one region is left.

    Region ids: the ``n`` initial regions are ``0 .. n-1``; merge ``t`` creates region
    ``n + t``. Ties go to the pair created first (initial pairs in ``(i, j)`` order, then
    pairs of each new region with its neighbours in ascending id order).

    Args:
        features: the initial regions (:func:`region_features`).
        strategy: a key of :data:`STRATEGIES`.

    Returns:
        ``(merges, bounds)``: ``np.ndarray[M, 2]`` int64, the two regions merged at step
        ``t`` (``M = n - 1`` for a connected image); ``np.ndarray[n + M, 4]`` int64
        inclusive pixel bounds of every region, initial then merged.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"hierarchical_grouping: unknown strategy {strategy!r}; choose from {list(STRATEGIES)}")
    use_colour, use_texture, use_size, use_fill = STRATEGIES[strategy]
    # Strategies without a histogram term carry a zero-width histogram (no cost).
    colour = features.colour if use_colour else np.zeros((features.num_regions, 0))
    texture = features.texture if use_texture else np.zeros((features.num_regions, 0))
    return _merge_kernel(
        np.ascontiguousarray(colour),
        np.ascontiguousarray(texture),
        features.sizes,
        features.bounds,
        features.pairs,
        use_size,
        use_fill,
        float(features.image_size),
    )


@numba.njit(cache=True)
def _similarity(colour, texture, sizes, bounds, a, b, use_size, use_fill, image_size):  # pragma: no cover
    s = 0.0
    for d in range(colour.shape[1]):
        s += min(colour[a, d], colour[b, d])
    t = 0.0
    for d in range(texture.shape[1]):
        t += min(texture[a, d], texture[b, d])
    s += t
    if use_size:
        s += 1.0 - (sizes[a] + sizes[b]) / image_size
    if use_fill:
        w = max(bounds[a, 2], bounds[b, 2]) - min(bounds[a, 0], bounds[b, 0]) + 1
        h = max(bounds[a, 3], bounds[b, 3]) - min(bounds[a, 1], bounds[b, 1]) + 1
        s += 1.0 - (w * h - sizes[a] - sizes[b]) / image_size
    return s


@numba.njit(cache=True)
def _merge_kernel(colour0, texture0, sizes0, bounds0, pairs0, use_size, use_fill, image_size):  # pragma: no cover
    n = sizes0.shape[0]
    total = 2 * n - 1
    colour = np.zeros((total, colour0.shape[1]))
    texture = np.zeros((total, texture0.shape[1]))
    sizes = np.zeros(total)
    bounds = np.zeros((total, 4), dtype=np.int64)
    colour[:n] = colour0
    texture[:n] = texture0
    sizes[:n] = sizes0
    bounds[:n] = bounds0
    # Active pairs live in order of creation; compaction keeps that order.
    capacity = 2 * pairs0.shape[0] + 16
    pa = np.empty(capacity, dtype=np.int64)
    pb = np.empty(capacity, dtype=np.int64)
    ps = np.empty(capacity)
    count = pairs0.shape[0]
    for p in range(count):
        pa[p] = pairs0[p, 0]
        pb[p] = pairs0[p, 1]
        ps[p] = _similarity(colour, texture, sizes, bounds, pa[p], pb[p], use_size, use_fill, image_size)
    merges = np.empty((n - 1, 2), dtype=np.int64)
    stamp = np.full(total, -1, dtype=np.int64)
    neighbours = np.empty(total, dtype=np.int64)
    steps = 0
    while count > 0 and steps < n - 1:
        best = 0
        for p in range(1, count):
            if ps[p] > ps[best]:
                best = p
        i, j = pa[best], pb[best]
        t = n + steps
        si, sj = sizes[i], sizes[j]
        sizes[t] = si + sj
        for d in range(colour.shape[1]):
            colour[t, d] = (si * colour[i, d] + sj * colour[j, d]) / (si + sj)
        for d in range(texture.shape[1]):
            texture[t, d] = (si * texture[i, d] + sj * texture[j, d]) / (si + sj)
        bounds[t, 0] = min(bounds[i, 0], bounds[j, 0])
        bounds[t, 1] = min(bounds[i, 1], bounds[j, 1])
        bounds[t, 2] = max(bounds[i, 2], bounds[j, 2])
        bounds[t, 3] = max(bounds[i, 3], bounds[j, 3])
        merges[steps, 0] = i
        merges[steps, 1] = j
        # drop every pair touching i or j; collect their other ends once
        num_nb = 0
        kept = 0
        for p in range(count):
            a, b = pa[p], pb[p]
            if a == i or a == j or b == i or b == j:
                other = b if (a == i or a == j) else a
                if other != i and other != j and stamp[other] != steps:
                    stamp[other] = steps
                    neighbours[num_nb] = other
                    num_nb += 1
            else:
                pa[kept] = a
                pb[kept] = b
                ps[kept] = ps[p]
                kept += 1
        count = kept
        if count + num_nb > capacity:  # cannot happen: merging never adds active pairs
            raise RuntimeError("merge kernel: pair buffer overflow")
        order = np.sort(neighbours[:num_nb])
        for q in range(num_nb):
            pa[count] = order[q]
            pb[count] = t
            ps[count] = _similarity(colour, texture, sizes, bounds, order[q], t, use_size, use_fill, image_size)
            count += 1
        steps += 1
    return merges[:steps], bounds[: n + steps]


def hierarchy_boxes(bounds: np.ndarray) -> np.ndarray:
    """Inclusive pixel bounds ``np.ndarray[N, 4]`` -> continuous xyxy ``np.ndarray[N, 4]`` float32."""
    boxes = np.asarray(bounds, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, 2:] += 1  # pixels a .. b span the continuous interval [a, b + 1)
    return boxes


def hierarchy_priorities(num_boxes: int) -> np.ndarray:
    """``(N:-1:1)'`` of ``Image2HierarchicalGrouping.m`` for ``[initial; merged]`` boxes.

    Returns:
        ``np.ndarray[N]`` float64 ``N, N-1, ..., 1``: the first initial segment gets ``N``,
        the last merge (the whole image) gets 1.
    """
    return np.arange(num_boxes, 0, -1, dtype=np.float64)


def rank_hierarchy_boxes(
    boxes_per_hierarchy: list[np.ndarray],
    priorities_per_hierarchy: list[np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """All boxes of an image ranked as R-CNN's ``selective_search_boxes.m`` ranks them.

    ``priority .* rand(size(priority))`` over the concatenated hierarchies (one uniform
    draw per box, in concatenation order), then a stable ascending sort (MATLAB's
    ``sort``); docs/sources.md 1.11, IJCV 2013 section 5 (``v_i = RND x i``).

    Args:
        boxes_per_hierarchy: per hierarchy ``np.ndarray[N_h, 4]`` xyxy boxes.
        priorities_per_hierarchy: per hierarchy ``np.ndarray[N_h]`` priorities
            (:func:`hierarchy_priorities`; smaller is better).
        rng: the generator the random factors are drawn from.

    Returns:
        ``np.ndarray[sum N_h, 4]`` float32, best first; ``[0, 4]`` for no boxes.
    """
    if len(boxes_per_hierarchy) != len(priorities_per_hierarchy):
        raise ValueError(
            f"rank_hierarchy_boxes: {len(boxes_per_hierarchy)} box arrays but "
            f"{len(priorities_per_hierarchy)} priority arrays"
        )
    if not boxes_per_hierarchy:
        return np.zeros((0, 4), dtype=np.float32)
    boxes = np.concatenate([np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes_per_hierarchy])
    priority = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for p in priorities_per_hierarchy])
    if len(priority) != len(boxes):
        raise ValueError(f"rank_hierarchy_boxes: {len(boxes)} boxes but {len(priority)} priorities")
    order = np.argsort(priority * rng.random(len(priority)), kind="stable")
    return np.ascontiguousarray(boxes[order])
