"""The compiled dual coordinate descent (svm.dcd) against liblinear (scikit-learn's
LinearSVC) on real pooled features, its warm start, C = "auto", and the box-regression
sample store against the in-memory fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from spp_detect.labels import class_overlaps
from spp_detect.window_features import open_caches, window_features
from svm.bbox_reg import BoxSampleStore, fit_box_regressor
from svm.dcd import solve_dcd
from svm.linear import RELEASE_IMAGES, SVM_C, auto_c, svm_objective, train_linear_svm
from svm.train import SVMSettings
from tests.test_detector import train_cache  # noqa: F401  (real SqueezeNet cache of VOC images)


@pytest.fixture(scope="module")
def problem(train_cache):  # noqa: F811
    """A real SVM problem: the ground truths of the commonest class as positives, windows
    with IoU < 0.3 against it as negatives, pooled features at mean norm 20, float16."""
    caches = open_caches([train_cache])
    pos, neg = [], []
    for image_id in caches[0].image_ids:
        image = caches[0].load(image_id)
        feats = window_features(image, "pool", None)
        overlaps = class_overlaps(image.boxes, image.gt_boxes, image.gt_labels, 20)
        c = 14 if bool((image.gt_labels == 14).any()) else int(image.gt_labels[0])
        pos.append(feats[image.is_gt & (overlaps[:, c] >= 1.0)])
        neg.append(feats[overlaps[:, c] < 0.3])
    pos, neg = torch.cat(pos), torch.cat(neg)
    scale = 20 / torch.cat([pos, neg]).norm(dim=1).mean()
    return (pos * scale).half(), (neg * scale).half()


def test_dcd_reaches_liblinears_optimum_and_stops_by_its_rule(problem):
    pos, neg = problem
    C = 0.01
    w_ref, b_ref = train_linear_svm(pos, neg, C=C, solver="liblinear", tol=1e-5, max_iter=100_000)  # ~exact optimum
    w, b = train_linear_svm(pos, neg, C=C, solver="dcd", tol=1e-5, max_iter=100_000)
    best = svm_objective(w_ref, b_ref, pos, neg, C=C)
    assert svm_objective(w, b, pos, neg, C=C) == pytest.approx(best, rel=1e-4)
    assert torch.allclose(w, w_ref, atol=2e-3 * float(w_ref.abs().max())) and b == pytest.approx(b_ref, abs=2e-3)
    x = torch.cat([pos, neg]).numpy()
    y = np.r_[np.ones(len(pos)), -np.ones(len(neg))]
    _, _, alpha, sweeps = solve_dcd(x, y, 2 * C, C, 10.0, tol=0.1)
    assert 1 <= sweeps < 1000 and alpha.min() >= 0
    assert alpha[: len(pos)].max() <= 2 * C + 1e-12 and alpha[len(pos):].max() <= C + 1e-12  # box constraints, -w1 2


def test_warm_start_from_the_optimum_stops_at_once_and_survives_eviction(problem):
    pos, neg = problem
    C = 0.01
    x = torch.cat([pos, neg]).numpy()
    y = np.r_[np.ones(len(pos)), -np.ones(len(neg))]
    w, b, alpha, _ = solve_dcd(x, y, 2 * C, C, 10.0, tol=1e-4)
    w2, b2, _, sweeps = solve_dcd(x, y, 2 * C, C, 10.0, tol=1e-4, alpha=alpha)
    assert sweeps <= 2 and np.allclose(w2, w, atol=1e-6) and b2 == pytest.approx(b, abs=1e-6)
    keep = np.r_[np.ones(len(pos), bool), np.arange(len(neg)) % 3 != 0]  # evict a third of the negatives
    w3, b3, _, _ = solve_dcd(x[keep], y[keep], 2 * C, C, 10.0, tol=1e-4, alpha=alpha[keep])
    w4, b4, _, _ = solve_dcd(x[keep], y[keep], 2 * C, C, 10.0, tol=1e-4)
    neg_kept = torch.from_numpy(x[keep][len(pos):])
    warm = svm_objective(torch.from_numpy(w3).float(), b3, pos, neg_kept, C=C)
    cold = svm_objective(torch.from_numpy(w4).float(), b4, pos, neg_kept, C=C)
    assert warm == pytest.approx(cold, rel=1e-3)


def test_c_auto_resolves_from_the_image_count(train_cache, tmp_path):  # noqa: F811
    assert auto_c(RELEASE_IMAGES) == SVM_C == 0.001
    assert auto_c(100) == pytest.approx(0.001 * 5011 / 100)
    settings = SVMSettings(layer="pool")
    assert settings.C == "auto" and settings.resolved_c(200) == pytest.approx(0.025055)
    assert SVMSettings(C="0.05") == SVMSettings(C=0.05)  # a command line's string is the number
    for bad in ("often", -1.0, 0):
        with pytest.raises(ValueError, match="'auto' or a positive number"):
            SVMSettings(C=bad)
    out = tmp_path / "svm"
    result = CliRunner().invoke(cli.main, ["train-svm", "--cache", str(train_cache), "--features", "pool", "--out", str(out)])
    assert result.exit_code == 0, result.output
    images = len(open_caches([train_cache])[0].image_ids)
    expected = 0.001 * 5011 / images
    assert f"(C = {expected:.4g})" in result.output
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["resolved_C"] == pytest.approx(expected)
    assert json.loads((out / "svm.json").read_text())["C"] == pytest.approx(expected)
    bad = CliRunner().invoke(cli.main, ["train-svm", "--cache", str(train_cache), "--features", "pool", "--C", "lots",
                                        "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "'auto' or a positive number" in bad.output


def test_box_sample_store_fits_as_the_in_memory_regressor(train_cache, tmp_path):  # noqa: F811
    from spp_detect.boxes import box_iou

    caches = open_caches([train_cache])
    store = BoxSampleStore(tmp_path / "samples", caches[0].feature_dim, 20)
    parts = []
    for image_id in caches[0].image_ids:
        image = caches[0].load(image_id)
        best, which = box_iou(image.boxes, image.gt_boxes).max(dim=1)
        rows = torch.nonzero(best > 0.5).flatten()
        pooled = window_features(image, "pool", None, rows)
        sample = (pooled, image.boxes[rows], image.gt_boxes[which[rows]], image.gt_labels[which[rows]])
        store.add(*sample)
        parts.append((pooled.half().float(),) + sample[1:])  # the store keeps float16 features
    feats, windows, targets, labels = (torch.cat(t) for t in zip(*parts))
    scale = float(20 / feats.norm(dim=1).mean())
    reference = fit_box_regressor(feats, windows, targets, labels, 20, scale, lam=4000.0)
    got = store.fit(scale, lam=4000.0, block=5)  # several blocks per class
    assert len(store) == len(feats) and torch.equal(got.trained, reference.trained) and bool(got.trained.any())
    assert torch.allclose(got.weights, reference.weights, atol=1e-5 * float(reference.weights.abs().max()) + 1e-8)
    assert torch.allclose(got.unwhiten, reference.unwhiten) and torch.allclose(got.mean, reference.mean)
    store.close()
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize("n", [40, 4])  # 40 rows: the primal system (d + 1 <= n); 4: the dual
def test_ridge_blocks_match_the_float64_ridge(n):
    from svm.bbox_reg import _ridge_blocks, fit_ridge

    rng = np.random.default_rng(n)
    feats = rng.random((n, 6)).astype(np.float16)  # non-negative, as pooled features
    y = torch.from_numpy(rng.normal(size=(n, 4)))
    scale, lam = 3.0, 2.0
    x = torch.cat([torch.from_numpy(feats.astype(np.float64)) * scale, torch.ones((n, 1), dtype=torch.float64)], dim=1)
    reference = fit_ridge(x, y, lam)
    got = _ridge_blocks(lambda a, b: feats[a:b], n, 6, scale, y, lam, block=3)  # several blocks
    assert got.dtype == torch.float64 and torch.allclose(got, reference, rtol=1e-4, atol=1e-5)
