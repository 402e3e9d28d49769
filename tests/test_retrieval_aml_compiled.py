"""The compiled AML against its slow reference (the torch + Python-loop version it replaced,
tests/reference_aml.py): the same boxes, scores and counts, on planted patterns and on the
quantised maps of real Paris6k photos through the real SqueezeNet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spp_detect.backbones import build_trunk, resolve_normalization
from spp_detect.extract import load_image_rgb, prepare_trunk
from spp_detect.retrieval.aml import aml_localize, aml_localize_many, quantize_levels
from spp_detect.retrieval.descriptors import crop_query, mac, region_macs
from spp_detect.retrieval.regions import rmac_regions
from spp_detect.retrieval.search import _region_maxima
from spp_detect.retrieval.index import full_res_maps
from tests.conftest import SQUEEZENET_FILE
from tests.reference_aml import aml_localize_reference
from tests.test_retrieval_aml import planted

PARIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paris6k-subset"


def _box_score(levels, query, box) -> float:
    """Cosine of a box's generalised max (alpha 10) with the query, in float64, cell by cell."""
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = levels[:, y1:y2, x1:x2].double().flatten(1)  # [C, cells]
    vector = (crop**10).sum(1) ** 0.1
    q = torch.as_tensor(np.asarray(query), dtype=torch.float64)
    return float(vector @ q / (vector.norm() * q.norm())) if float(vector.norm()) > 0 else 0.0


def _same(fast, slow, levels, query):
    """The same search: equal counts and scores; equal boxes, unless the two boxes tie (the
    reference rounds its cosines to float32, the compiled search keeps float64)."""
    assert fast.evaluated == slow.evaluated
    assert abs(fast.score - slow.score) < 1e-6
    if fast.box.tolist() != slow.box.tolist():
        assert abs(_box_score(levels, query, fast.box) - _box_score(levels, query, slow.box)) < 1e-6, (fast, slow)


def test_planted_and_random_maps_match_the_reference():
    rng = np.random.default_rng(5)
    cases = [planted(seed, box) + ((box[3] - box[1]) / (box[2] - box[0]),)
             for seed, box in [(0, (9, 6, 21, 15)), (1, (20, 3, 38, 27)), (2, (1, 14, 13, 29))]]
    for _ in range(6):  # random levels, random shapes (some too small for the coarse grid)
        h, w = rng.integers(1, 25, 2)
        levels = torch.from_numpy(rng.integers(0, 9, (8, h, w)).astype(np.uint8) * (rng.random((8, h, w)) < 0.4))
        cases.append((levels, rng.random(8) * 3, float(rng.uniform(0.3, 3))))
    for levels, query, ratio in cases:
        _same(aml_localize(levels, query, ratio), aml_localize_reference(levels, query, ratio), levels, query)
        _same(aml_localize(levels, query, ratio, refine_iterations=0),
              aml_localize_reference(levels, query, ratio, refine_iterations=0), levels, query)
    many = aml_localize_many([c[0] for c in cases[3:]], cases[3][1], cases[3][2])
    for found, (levels, _, _) in zip(many, cases[3:]):
        single = aml_localize(levels, cases[3][1], cases[3][2])  # batched == one at a time, exactly
        assert (found.box.tolist(), found.score, found.evaluated) == (single.box.tolist(), single.score, single.evaluated)
    assert aml_localize_many([], cases[0][1], 1.0) == []


def test_one_cell_map_scores_the_whole_map():
    levels = torch.full((3, 1, 1), 4, dtype=torch.uint8)
    found = aml_localize(levels, np.array([1.0, 0, 0]), 1.0)
    assert found.box.tolist() == [0, 0, 1, 1] and found.evaluated == 1
    assert found.score == pytest.approx(1 / np.sqrt(3))
    _same(found, aml_localize_reference(levels, np.array([1.0, 0, 0]), 1.0), levels, np.array([1.0, 0, 0]))


def test_real_paris_maps_match_the_reference():
    torch.set_num_threads(2)
    ground = json.loads((PARIS / "gnd_paris6k_subset.json").read_text())
    images = sorted(p for p in (PARIS / "jpg").glob("*.jpg"))[::40][:6]  # 6 database photos, several landmarks
    trunk = prepare_trunk(build_trunk("squeezenet1_0", str(SQUEEZENET_FILE)), torch.device("cpu"))
    norm = resolve_normalization("squeezenet1_0", str(SQUEEZENET_FILE))
    with torch.no_grad():
        maps = [full_res_maps(trunk, norm, load_image_rgb(p)) for p in images]
        cap = float(np.percentile(torch.cat([m[m > 0] for m in maps]).numpy(), 99.9))
        levels = [quantize_levels(m, cap) for m in maps]
        queries = []
        for name, gnd in list(zip(ground["qimlist"], ground["gnd"]))[::5][:3]:
            crop = crop_query(load_image_rgb(PARIS / "jpg" / f"{name}.jpg"), tuple(gnd["bbx"]))
            queries.append((mac(full_res_maps(trunk, norm, crop)), crop.shape[0] / crop.shape[1]))
    for query, ratio in queries:
        fast = aml_localize_many(levels, query, ratio)
        for found, lv in zip(fast, levels):
            _same(found, aml_localize_reference(lv, query, ratio), lv, query)
            assert found.evaluated > 50  # real maps: a real coarse grid and refinement
            # the box's R-MAC regions: compiled maxima == roi_pool on the float crop (as before)
            x1, y1, x2, y2 = (int(v) for v in found.box)
            regions = rmac_regions(y2 - y1, x2 - x1, 3)
            expected = region_macs(lv[:, y1:y2, x1:x2].float(), regions)
            assert np.array_equal(_region_maxima(lv.numpy(), x1, y1, regions), expected)


def test_simd_tenth_root_is_pow_to_two_ulp():
    from spp_detect.retrieval.aml import _POW10, _root10

    rng = np.random.default_rng(0)
    levels = rng.integers(0, 9, size=(4000, 300))  # sums of level ** 10 over up to 300 cells
    totals = np.concatenate([_POW10.numpy()[levels].sum(axis=1), _POW10.numpy(), [0.0, 1.0, 2.0**53 - 1]])
    out = np.empty_like(totals)
    _root10(totals, np.empty(len(totals), dtype=np.int64), out)
    expected = np.where(totals > 0, totals**0.1, 0.0)
    assert out[totals == 0].tolist() == [0.0] * int((totals == 0).sum())
    assert np.all(np.abs(out - expected) <= 2 * np.spacing(expected))  # within two ulp of pow
