"""Oxford/Paris AP (compute_map.m): hand-computed cases, junk handling, a loop port."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval.retrieval import average_precision, load_paris_ground_truth, mean_average_precision
from tests.conftest import SHARED_DATA


def compute_map_loop(ranking, ok, junk):
    """Line-by-line port of compute_map.m + score_ap_from_ranks1 (1-based positions)."""
    pos = sorted(i + 1 for i, r in enumerate(ranking) if r in set(ok))
    junk_pos = sorted(i + 1 for i, r in enumerate(ranking) if r in set(junk))
    k, ij = 0, 0
    if junk_pos:
        for ip in range(len(pos)):
            while ij < len(junk_pos) and pos[ip] > junk_pos[ij]:
                k, ij = k + 1, ij + 1
            pos[ip] -= k
    ap = 0.0
    for j, rank in enumerate(pos, start=1):
        rank -= 1
        p0 = 1.0 if rank == 0 else (j - 1) / rank
        ap += (p0 + j / (rank + 1)) / len(ok) / 2
    return ap


def test_hand_computed():
    # positives at ranks 0 and 2 of 3: ((1 + 1)/2 + (1/2 + 2/3)/2) / 2
    assert average_precision(np.array([5, 9, 7]), [5, 7], []) == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2)
    # the junk image 9 is removed: positives at ranks 0, 1 -> AP 1
    assert average_precision(np.array([5, 9, 7]), [5, 7], [9]) == 1.0
    # junk after all positives changes nothing; a positive missing from the ranking adds 0
    assert average_precision(np.array([5, 7, 9]), [5, 7, 4], [9]) == pytest.approx(2 / 3)
    # first positive at rank 1 behind junk and a negative: ranking [j, n, p, j, p], ok = {p1, p2}
    # -> shifted ranks 1 and 2: (0/1 + 1/2)/2/2 + (1/2 + 2/3)/2/2
    value = average_precision(np.array([10, 11, 1, 12, 2]), [1, 2], [10, 12])
    assert value == pytest.approx((0.5 / 2 + (0.5 + 2 / 3) / 2) / 2)
    with pytest.raises(ValueError, match="no positive"):
        average_precision(np.array([1, 2]), [], [])


def test_matches_loop_port_on_random_rankings():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(5, 60))
        ranking = rng.permutation(n)
        labels = rng.integers(0, 3, n)  # 0 negative, 1 ok, 2 junk
        labels[rng.integers(n)] = 1
        ok, junk = np.flatnonzero(labels == 1), np.flatnonzero(labels == 2)
        assert average_precision(ranking, ok, junk) == pytest.approx(compute_map_loop(list(ranking), ok, junk), abs=1e-12)


def test_paris_ground_truth_and_perfect_ranking():
    path = SHARED_DATA / "paris6k-subset" / "gnd_paris6k_subset.json"
    imlist = json.loads(path.read_text())["imlist"]
    database = imlist[::-1]  # any index order: the loader remaps
    queries = load_paris_ground_truth(path, database)
    assert len(queries) == 14 and queries[0].name == "defense_2"
    assert database[queries[0].ok[0]] in imlist and queries[0].box == (258.0, 88.0, 805.0, 619.0)
    perfect = [np.r_[q.ok, np.setdiff1d(np.arange(len(database)), q.ok)] for q in queries]
    value, aps = mean_average_precision(perfect, queries)
    assert value == 1.0 and aps.shape == (14,)
    with pytest.raises(ValueError, match="lacks 2 image"):
        load_paris_ground_truth(path, database[2:])
