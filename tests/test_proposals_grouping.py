"""Hierarchical grouping and the paper's ranking: fast kernels against slow references."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from proposals.grouping import (
    COLOUR_BINS,
    STRATEGIES,
    TEXTURE_BINS,
    RegionFeatures,
    colour_bin_image,
    hierarchical_grouping,
    hierarchy_boxes,
    hierarchy_priorities,
    rank_hierarchy_boxes,
    region_features,
    segment,
    texture_bin_image,
)
from proposals.selective_search import selective_search


# --------------------------------------------------------------------------- helpers
def real_crop(voc_root: Path, space: int = cv2.COLOR_BGR2HSV, size: tuple[int, int] = (96, 72)) -> np.ndarray:
    """A colour-space crop of VOC2007 test image 000001 (a dog and a person)."""
    image = cv2.imread(str(voc_root / "VOC2007" / "JPEGImages" / "000001.jpg"))
    assert image is not None
    crop = np.ascontiguousarray(image[150 : 150 + size[1], 100 : 100 + size[0]])
    return cv2.cvtColor(crop, space)


def features_of(image: np.ndarray, ranges: tuple[int, ...], k: int = 50) -> RegionFeatures:
    labels = segment(image, 0.8, k, k)
    return region_features(labels, colour_bin_image(image, ranges), texture_bin_image(image))


def reference_texture_bins(image: np.ndarray) -> np.ndarray:
    """Whole-array numpy version of :func:`texture_bin_image` (one orientation map at a time)."""
    height, width, channels = image.shape
    x = np.arange(-3, 4, dtype=np.float64)
    gauss = np.exp(-(x**2) / 2)
    gauss /= gauss.sum()
    deriv = -x * gauss
    out = np.empty((height, width, channels * 8), dtype=np.int64)
    half = np.float32(np.sqrt(0.5))
    for c in range(channels):
        plane = image[:, :, c].astype(np.float32)
        dx = cv2.sepFilter2D(plane, cv2.CV_32F, deriv, gauss, borderType=cv2.BORDER_REFLECT)
        dy = cv2.sepFilter2D(plane, cv2.CV_32F, gauss, deriv, borderType=cv2.BORDER_REFLECT)
        for d, response in enumerate((dx, (dx + dy) * half, dy, (dy - dx) * half)):
            for s, part in enumerate((np.maximum(response, 0), np.maximum(-response, 0))):
                o = c * 8 + 2 * d + s
                top = float(part.max())
                scaled = part * np.float32(10 / top) if top > 0 else np.zeros_like(part)
                out[:, :, o] = np.minimum(scaled.astype(np.int64), 9) + o * 10
    return out


def reference_features(labels: np.ndarray, colour_bins: np.ndarray, texture_bins: np.ndarray):
    """Region by region: histograms, sizes, bounds; neighbours pixel by pixel."""
    n = int(labels.max()) + 1
    colour = np.zeros((n, colour_bins.shape[2] * COLOUR_BINS))
    texture = np.zeros((n, texture_bins.shape[2] * TEXTURE_BINS))
    sizes = np.zeros(n)
    bounds = np.zeros((n, 4), dtype=np.int64)
    for r in range(n):
        ys, xs = np.nonzero(labels == r)
        sizes[r] = len(ys)
        bounds[r] = xs.min(), ys.min(), xs.max(), ys.max()
        for b in colour_bins[ys, xs].reshape(-1):
            colour[r, b] += 1
        for b in texture_bins[ys, xs].reshape(-1):
            texture[r, b] += 1
    pairs = set()
    height, width = labels.shape
    for y in range(height):
        for x in range(width):
            for ny, nx in ((y, x + 1), (y + 1, x)):
                if ny < height and nx < width and labels[y, x] != labels[ny, nx]:
                    a, b = sorted((int(labels[y, x]), int(labels[ny, nx])))
                    pairs.add((a, b))
    return colour / colour.sum(1, keepdims=True), texture / texture.sum(1, keepdims=True), sizes, bounds, sorted(pairs)


def reference_grouping(features: RegionFeatures, strategy: str):
    """Uijlings' greedy merging written plainly: dicts of regions, an ordered dict of pairs."""
    use_colour, use_texture, use_size, use_fill = STRATEGIES[strategy]
    n = features.num_regions
    colour = {r: features.colour[r] for r in range(n)}
    texture = {r: features.texture[r] for r in range(n)}
    sizes = {r: float(features.sizes[r]) for r in range(n)}
    bounds = {r: [int(v) for v in features.bounds[r]] for r in range(n)}
    image_size = float(features.image_size)

    def similarity(a: int, b: int) -> float:
        s = 0.0
        if use_colour:
            for v in np.minimum(colour[a], colour[b]):
                s += float(v)
        t = 0.0
        if use_texture:
            for v in np.minimum(texture[a], texture[b]):
                t += float(v)
        s += t
        if use_size:
            s += 1.0 - (sizes[a] + sizes[b]) / image_size
        if use_fill:
            w = max(bounds[a][2], bounds[b][2]) - min(bounds[a][0], bounds[b][0]) + 1
            h = max(bounds[a][3], bounds[b][3]) - min(bounds[a][1], bounds[b][1]) + 1
            s += 1.0 - (w * h - sizes[a] - sizes[b]) / image_size
        return s

    pairs = {(int(a), int(b)): similarity(int(a), int(b)) for a, b in features.pairs}
    merges = []
    while pairs:
        best = max(pairs.values())
        i, j = next(pair for pair, s in pairs.items() if s == best)  # first pair with the best value
        t = n + len(merges)
        si, sj = sizes[i], sizes[j]
        sizes[t] = si + sj
        colour[t] = (si * colour[i] + sj * colour[j]) / (si + sj)
        texture[t] = (si * texture[i] + sj * texture[j]) / (si + sj)
        bi, bj = bounds[i], bounds[j]
        bounds[t] = [min(bi[0], bj[0]), min(bi[1], bj[1]), max(bi[2], bj[2]), max(bi[3], bj[3])]
        touching = [pair for pair in pairs if i in pair or j in pair]
        neighbours = sorted({r for pair in touching for r in pair} - {i, j})
        for pair in touching:
            del pairs[pair]
        for r in neighbours:
            pairs[(r, t)] = similarity(r, t)
        merges.append((i, j))
    return np.array(merges, dtype=np.int64).reshape(-1, 2), np.array([bounds[r] for r in range(n + len(merges))])


# --------------------------------------------------------------------------- ranking
class FixedDraws:
    """A stand-in for ``np.random.Generator`` whose ``random(n)`` returns given numbers."""

    def __init__(self, draws) -> None:
        self.draws = np.asarray(draws, dtype=np.float64)

    def random(self, size: int) -> np.ndarray:
        assert size == len(self.draws)
        return self.draws


def hand_made_hierarchies():
    # Hierarchy 1: initial segments A, B (priorities 4, 3), merge C = A + B (2), then the
    # whole image D = C + another segment (1). Hierarchy 2: initial E (3), F (2), merge G (1).
    names = ["A", "B", "C", "D", "E", "F", "G"]
    boxes = [np.array([[i, 0, i + 1, 1] for i in range(4)], np.float32), np.array([[i, 5, i + 1, 6] for i in range(3)], np.float32)]
    return names, boxes, [hierarchy_priorities(4), hierarchy_priorities(3)]


def ranked_names(names, boxes, ranked):
    flat = np.concatenate(boxes).tolist()
    return [names[flat.index(row)] for row in ranked.tolist()]


def test_hierarchy_priorities_count_down_to_the_last_merge():
    np.testing.assert_array_equal(hierarchy_priorities(5), [5, 4, 3, 2, 1])
    assert hierarchy_priorities(0).shape == (0,)


def test_rank_equal_draws_gives_priority_order_stable_across_hierarchies():
    names, boxes, priorities = hand_made_hierarchies()
    ranked = rank_hierarchy_boxes(boxes, priorities, FixedDraws([0.5] * 7))
    # priorities A4 B3 C2 D1 | E3 F2 G1, ascending, ties in concatenation order
    assert ranked_names(names, boxes, ranked) == ["D", "G", "C", "F", "B", "E", "A"]


def test_rank_random_factor_reorders_as_priority_times_draw():
    names, boxes, priorities = hand_made_hierarchies()
    draws = [0.9, 0.05, 0.7, 0.95, 0.1, 0.45, 0.35]
    # A 3.6, B 0.15, C 1.4, D 0.95, E 0.3, F 0.9, G 0.35
    ranked = rank_hierarchy_boxes(boxes, priorities, FixedDraws(draws))
    assert ranked_names(names, boxes, ranked) == ["B", "E", "G", "F", "D", "C", "A"]
    assert ranked.dtype == np.float32 and ranked.shape == (7, 4)


def test_rank_with_seeded_generator_is_reproducible_and_a_permutation():
    names, boxes, priorities = hand_made_hierarchies()
    first = rank_hierarchy_boxes(boxes, priorities, np.random.default_rng(3))
    again = rank_hierarchy_boxes(boxes, priorities, np.random.default_rng(3))
    np.testing.assert_array_equal(first, again)
    assert sorted(ranked_names(names, boxes, first)) == names


def test_rank_empty_and_mismatched_input():
    assert rank_hierarchy_boxes([], [], np.random.default_rng(0)).shape == (0, 4)
    with pytest.raises(ValueError, match="priorities"):
        rank_hierarchy_boxes([np.zeros((2, 4))], [np.ones(3)], np.random.default_rng(0))


# --------------------------------------------------------------------------- grouping
def test_hand_made_regions_merge_by_size():
    # one row of 6 pixels: regions 0 (2 px) | 1 (1 px) | 2 (3 px); size similarity merges
    # the smallest neighbouring pair first: (0, 1) -> 3, then (2, 3) -> 4 (the whole row)
    labels = np.array([[0, 0, 1, 2, 2, 2]])
    image = np.zeros((1, 6, 3), np.uint8)
    features = region_features(labels, colour_bin_image(image, (256,) * 3), texture_bin_image(image))
    np.testing.assert_array_equal(features.pairs, [[0, 1], [1, 2]])
    merges, bounds = hierarchical_grouping(features, "size")
    np.testing.assert_array_equal(merges, [[0, 1], [2, 3]])
    np.testing.assert_array_equal(bounds, [[0, 0, 1, 0], [2, 0, 2, 0], [3, 0, 5, 0], [0, 0, 2, 0], [0, 0, 5, 0]])
    np.testing.assert_array_equal(hierarchy_boxes(bounds)[-1], [0, 0, 6, 1])


def test_labels_with_gaps_are_renumbered():
    labels = np.array([[0, 0, 4, 7, 7, 7]])  # labels 1-3, 5, 6 unused
    image = np.zeros((1, 6, 3), np.uint8)
    features = region_features(labels, colour_bin_image(image, (256,) * 3), texture_bin_image(image))
    np.testing.assert_array_equal(features.sizes, [2, 1, 3])
    np.testing.assert_array_equal(features.pairs, [[0, 1], [1, 2]])
    assert np.isfinite(features.colour).all() and np.isfinite(features.texture).all()


def test_texture_bins_equal_the_numpy_reference(voc_root: Path):
    for space in (cv2.COLOR_BGR2HSV, cv2.COLOR_BGR2Lab):
        image = real_crop(voc_root, space, (120, 90))
        np.testing.assert_array_equal(texture_bin_image(image), reference_texture_bins(image))


def test_region_features_equal_the_slow_reference(voc_root: Path):
    image = real_crop(voc_root)
    labels = segment(image, 0.8, 50, 50)
    colour_bins, texture_bins = colour_bin_image(image, (180, 256, 256)), texture_bin_image(image)
    features = region_features(labels, colour_bins, texture_bins)
    colour, texture, sizes, bounds, pairs = reference_features(labels, colour_bins, texture_bins)
    assert features.num_regions > 10 and features.image_size == 96 * 72
    np.testing.assert_array_equal(features.sizes, sizes)
    np.testing.assert_array_equal(features.bounds, bounds)
    np.testing.assert_array_equal(features.pairs, np.array(pairs))
    np.testing.assert_allclose(features.colour, colour, rtol=0, atol=1e-15)
    np.testing.assert_allclose(features.texture, texture, rtol=0, atol=1e-15)
    assert colour_bins.max() < 3 * COLOUR_BINS and texture_bins.max() < 24 * TEXTURE_BINS


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_merge_kernel_equals_the_python_reference_on_a_real_crop(voc_root: Path, strategy: str):
    features = features_of(real_crop(voc_root), (180, 256, 256))
    merges, bounds = hierarchical_grouping(features, strategy)
    expected_merges, expected_bounds = reference_grouping(features, strategy)
    assert len(merges) == features.num_regions - 1  # one region at the end
    np.testing.assert_array_equal(merges, expected_merges)
    np.testing.assert_array_equal(bounds, expected_bounds)
    np.testing.assert_array_equal(bounds[-1], [0, 0, 95, 71])  # the whole crop


def test_unknown_strategy_is_refused(voc_root: Path):
    with pytest.raises(ValueError, match="unknown strategy"):
        hierarchical_grouping(features_of(real_crop(voc_root), (180, 256, 256)), "colour")


# --------------------------------------------------------------------------- the ranking on a real image
def test_selective_search_is_the_ranked_union_of_its_hierarchies(voc_root: Path):
    image = cv2.imread(str(voc_root / "VOC2007" / "JPEGImages" / "000001.jpg"))[100:260, 60:300]
    boxes, priorities = [], []
    for space, ranges in ((cv2.COLOR_BGR2HSV, (180, 256, 256)), (cv2.COLOR_BGR2Lab, (256, 256, 256))):
        converted = cv2.cvtColor(np.ascontiguousarray(image), space)
        for k in (50, 100):
            features = features_of(converted, ranges, k)
            for strategy in ("colour+texture+size+fill", "texture+size+fill"):
                bounds = hierarchical_grouping(features, strategy)[1]
                boxes.append(hierarchy_boxes(bounds))
                priorities.append(hierarchy_priorities(len(bounds)))
    expected = rank_hierarchy_boxes(boxes, priorities, np.random.default_rng(5))
    np.testing.assert_array_equal(selective_search(np.ascontiguousarray(image), "fast", seed=5), expected)


def test_first_boxes_are_large_regions_last_are_segments(voc_root: Path):
    image = cv2.imread(str(voc_root / "VOC2007" / "JPEGImages" / "000001.jpg"))
    boxes = selective_search(image, "fast")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # the paper's order: high regions first; OpenCV's inverted order fails this by far
    assert np.median(area[:100]) > 10 * np.median(area[-100:])
    assert [0, 0, 353, 500] in boxes[:50].tolist()  # some hierarchy's last merge (353 x 500 image)
