"""AML: quantisation, the coarse candidates of aml.c, and localisation of a planted pattern."""

from __future__ import annotations

import math

import numpy as np
import torch

from spp_detect.retrieval.aml import aml_localize, coarse_boxes, quantize_levels


def test_quantize_release_rule():
    x = torch.tensor([0.0, 0.99, 1.0, 16.9, 17.0, 112.9, 113.0, 128.0, 5000.0]).view(1, 1, -1)
    assert quantize_levels(x).flatten().tolist() == [0, 0, 1, 1, 2, 7, 8, 8, 8]
    # cap 256: values are halved first, so 2.0 -> 1 -> level 1
    assert quantize_levels(x * 2, cap=256).flatten().tolist() == [0, 0, 1, 1, 2, 7, 8, 8, 8]


def test_coarse_boxes_match_aml_c_loops():
    height, width, ratio, step, tol = 17, 20, 1.0, 3, 1.3
    expected = []
    for i1 in range(1, height - 1 + 1, step):  # aml.c max_score, 1-based inclusive rows i, columns j
        for i2 in range(i1 + 1, height + 1, step):
            for j1 in range(1, width - 1 + 1, step):
                for j2 in range(j1 + 1, width + 1, step):
                    if abs(math.log(ratio / ((i2 - i1 + 1) / (j2 - j1 + 1)))) > math.log(tol):
                        continue
                    expected.append((j1 - 1, i1 - 1, j2, i2))
    got = coarse_boxes(height, width, ratio, step, tol)
    assert sorted(map(tuple, got.tolist())) == sorted(expected) and len(expected) > 5
    assert len(coarse_boxes(1, 5, 1.0)) == 0


def planted(seed: int, box: tuple[int, int, int, int], height: int = 30, width: int = 40):
    """16 channels: the query fires on channels 0-7; inside ``box`` they peak (level 8) and
    channels 8-15 are silent; outside, channels 8-15 peak and 0-7 only murmur (level 1)."""
    rng = np.random.default_rng(seed)
    levels = np.zeros((16, height, width), dtype=np.uint8)
    levels[:8] = (rng.random((8, height, width)) < 0.3).astype(np.uint8)
    levels[8:] = (rng.random((8, height, width)) < 0.05) * 8
    x1, y1, x2, y2 = box
    levels[:, y1:y2, x1:x2] = 0
    for c in range(8):  # the pattern: two peaks per channel inside the box
        ys, xs = rng.integers(y1, y2, 2), rng.integers(x1, x2, 2)
        levels[c, ys, xs] = 8
        levels[c, y1:y2, x1:x2] = np.maximum(levels[c, y1:y2, x1:x2], rng.random((y2 - y1, x2 - x1)) < 0.3)
    query = np.r_[np.full(8, 5.0), np.zeros(8)]
    return torch.from_numpy(levels), query


def test_finds_planted_pattern_within_one_grid_step():
    for seed, box in [(0, (9, 6, 21, 15)), (1, (20, 3, 38, 27)), (2, (1, 14, 13, 29))]:
        levels, query = planted(seed, box)
        ratio = (box[3] - box[1]) / (box[2] - box[0])
        found = aml_localize(levels, query, ratio)
        assert np.abs(found.box - np.array(box)).max() <= 3, (seed, found.box, box)
        assert 0.9 < found.score <= 1.0 + 1e-6 and found.evaluated > 10


def test_refinement_improves_on_coarse_grid():
    levels, query = planted(3, (4, 4, 15, 12))
    coarse_only = aml_localize(levels, query, 8 / 11, refine_iterations=0)
    refined = aml_localize(levels, query, 8 / 11)
    assert refined.score >= coarse_only.score and refined.evaluated > coarse_only.evaluated
