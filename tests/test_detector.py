"""The detector stages on real cached features: labels, SVMs, mining, box regression,
fine-tuning, detection, and the crop-warp baseline."""

from __future__ import annotations

from pathlib import Path
import copy

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from eval.results import read_detections
from spp_detect.box_coder import decode_boxes, encode_boxes
from spp_detect.cache import FeatureCache
from spp_detect.datasets import read_voc
from spp_detect.detect import DetectSettings, _per_class_nms
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.finetune import FinetuneSettings, _draw_round, _pool_rows, collect_training_windows, run_finetune
from spp_detect.head import SPPHead, load_head
from spp_detect.labels import class_overlaps
from spp_detect.spp import spatial_pyramid_pool
from spp_detect.window_features import PoolBuffer, distinct_windows, open_caches, window_features, window_scores
from svm.bbox_reg import fit_box_regressor, fit_ridge
from svm.dcd import half_scores, solve_dcd
from svm.feature_store import HalfStore
from svm.hard_negatives import NegativeCache
from svm.linear import train_linear_svm
from tests.conftest import SQUEEZENET_FILE, jittered_proposals, proposals_mat

SCALES = (240, 336)


def _extract(images, out, mode="spp", scales=SCALES, count=40):
    settings = ExtractSettings(backbone="squeezenet1_0", weights=str(SQUEEZENET_FILE), scales=scales, mode=mode)
    run_extract(images, proposals_mat(jittered_proposals(images, count), Path(f"{out}-proposals")), out, settings, image_set="x",
                device=torch.device("cpu"))
    return out


@pytest.fixture(scope="module")
def train_cache(voc_root, tmp_path_factory):
    images = read_voc(voc_root, "trainval")[:8]
    return _extract(images, tmp_path_factory.mktemp("feat") / "train")


@pytest.fixture(scope="module")
def test_cache(voc_root, tmp_path_factory):
    images = read_voc(voc_root, "test")[:3]
    return _extract(images, tmp_path_factory.mktemp("feat") / "test")


# --------------------------------------------------------------------------- labels, cache
def test_class_overlaps_hand_example():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    windows = torch.tensor([[0.0, 0, 10, 5], [20, 20, 30, 30], [50, 50, 60, 60]])
    out = class_overlaps(windows, gt, torch.tensor([2, 0]), 3)
    expected = torch.tensor([[0.0, 0, 0.5], [1.0, 0, 0], [0, 0, 0]])
    assert torch.allclose(out, expected)
    assert class_overlaps(windows[:0], gt, torch.tensor([2, 0]), 3).shape == (0, 3)
    assert class_overlaps(windows, gt[:0], torch.tensor([], dtype=torch.int64), 3).abs().sum() == 0


def test_cache_stores_labels_and_cells_at_own_scale_match(train_cache, voc_root):
    cache = FeatureCache(train_cache)
    voc = {im.image_id: im for im in read_voc(voc_root, "trainval")[:8]}
    image = cache.load(cache.image_ids[0])
    assert image.gt_labels.tolist() == voc[image.image_id].labels.tolist()
    assert image.gt_difficult.tolist() == voc[image.image_id].difficult.tolist()
    every = torch.arange(len(image))
    assert torch.equal(image.cells_at(every, image.scale_index), image.cells)
    other = 1 - image.scale_index  # two scales: the other one
    feats = image.features(every, scale_index=other)
    fmap = image.maps[1]
    rows = other == 1
    assert torch.equal(feats[rows], spatial_pyramid_pool(fmap, image.cells_at(every[rows], other[rows])))


def test_window_features_dedup_equals_plain_pooling(train_cache):
    image = FeatureCache(train_cache).load(FeatureCache(train_cache).image_ids[1])
    dup = torch.cat([torch.arange(len(image)), torch.tensor([0, 0, 3])])
    first, inverse = distinct_windows(image, dup)
    assert len(first) < len(dup) and len(inverse) == len(dup)
    keys = torch.cat([image.scale_index[dup, None], image.cells[dup]], 1)
    assert torch.equal(keys[first][inverse], keys)  # every window shares its group's key
    assert torch.equal(window_features(image, "pool", None, dup), image.features(dup))
    head = SPPHead(image.features(torch.tensor([0])).shape[1], 16).eval()
    with torch.no_grad():
        assert torch.allclose(window_features(image, "fc7", head, dup), head.features(image.features(dup), "fc7"), atol=1e-5)


def test_window_features_and_scores_keep_the_callers_order(train_cache):
    # distinct windows are pooled grouped by scale and cells, not in the caller's order:
    # the results must come back in the caller's order, with and without duplicates
    image = FeatureCache(train_cache).load(FeatureCache(train_cache).image_ids[1])
    first, _ = distinct_windows(image)
    shuffled = first[torch.randperm(len(first), generator=torch.Generator().manual_seed(0))]
    head = SPPHead(image.features(torch.tensor([0])).shape[1], 16).eval()
    weights = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))

    def scorer(x: torch.Tensor, overwrite_input: bool = False) -> torch.Tensor:
        return (x.mul_(2.0) if overwrite_input else x * 2.0) @ weights

    for windows in (shuffled, torch.cat([shuffled, shuffled[:5]])):
        plain = image.features(windows)
        assert torch.equal(window_features(image, "pool", None, windows), plain)
        with torch.no_grad():
            fc7 = head.features(plain.clone(), "fc7")
        buffer, timings = PoolBuffer(), {}
        got = window_scores(image, scorer, "fc7", head, windows, batch_size=64, buffer=buffer, timings=timings)
        assert torch.allclose(got, scorer(fc7), atol=1e-5)
        assert set(timings) == {"pool", "fc", "score"} and min(timings.values()) > 0


def test_bf16_head_scores_close_to_fp32_and_settings_check_precision(train_cache):
    image = FeatureCache(train_cache).load(FeatureCache(train_cache).image_ids[0])
    head = SPPHead(image.features(torch.tensor([0])).shape[1], 32, input_scale=0.01).eval()
    weights = torch.randn(32, 4, generator=torch.Generator().manual_seed(2))

    def scorer(x: torch.Tensor, overwrite_input: bool = False) -> torch.Tensor:
        assert x.dtype == torch.float32  # the SVMs always see float32 features
        return x @ weights

    exact = window_scores(image, scorer, "fc7", head)
    rounded = window_scores(image, scorer, "fc7", copy.deepcopy(head).to(torch.bfloat16))
    assert not torch.equal(rounded, exact)  # it really ran in bf16
    assert torch.allclose(rounded, exact, rtol=0.05, atol=0.05 * float(exact.abs().mean()))
    with pytest.raises(ValueError, match="precision must be one of"):
        DetectSettings(precision="fp16")


def test_crop_warp_cache_pools_each_crop_whole(voc_root, tmp_path):
    from spp_detect.backbones import build_trunk, resolve_normalization
    from spp_detect.extract import crop_warp_maps
    from spp_detect.image_trunk import load_image_rgb, prepare_trunk

    image = read_voc(voc_root, "test")[0]
    out = _extract([image], tmp_path / "cw", mode="crop-warp", scales=(224,), count=3)
    cached = FeatureCache(out).load(image.image_id)
    trunk = prepare_trunk(build_trunk("squeezenet1_0", SQUEEZENET_FILE), torch.device("cpu"))
    norm = resolve_normalization("squeezenet1_0", SQUEEZENET_FILE)
    pixels = load_image_rgb(image.path)
    for j in (0, len(cached) - 1):  # a ground truth and a proposal, each on its own
        tiled, cells = crop_warp_maps(trunk, norm, pixels, cached.boxes[j : j + 1], 224, 16, torch.device("cpu"))
        assert tiled.shape[1:] == (13, 13) and cells.tolist() == [[0, 0, 12, 12]]
        alone = spatial_pyramid_pool(tiled, cells)
        assert torch.allclose(cached.features(torch.tensor([j])), alone.half().float(), rtol=2e-3, atol=1e-2)


# --------------------------------------------------------------------------- SVMs and mining
def test_svm_separates_two_classes_of_real_features(train_cache):
    caches = open_caches([train_cache])
    feats, labels = [], []
    for image_id in caches[0].image_ids:
        image = caches[0].load(image_id)
        overlaps = class_overlaps(image.boxes, image.gt_boxes, image.gt_labels, 20)
        best, cls = overlaps.max(1)
        rows = torch.nonzero(best >= 0.7).flatten()
        feats.append(window_features(image, "pool", None, rows))
        labels.append(cls[rows])
    feats, labels = torch.cat(feats), torch.cat(labels)
    a, b = torch.bincount(labels).topk(2).indices.tolist()  # the two commonest classes
    scale = 20 / feats.norm(dim=1).mean()
    pos, neg = feats[labels == a] * scale, feats[labels == b] * scale
    w, bias = train_linear_svm(pos, neg, C=1.0)
    assert bool(((pos @ w + bias) > 0).all()) and bool(((neg @ w + bias) < 0).all())
    with pytest.raises(ValueError, match="positives and negatives"):
        train_linear_svm(pos, neg[:0])


def test_mining_adds_and_evicts_by_the_release_thresholds():
    cache = NegativeCache(retrain_limit=3)
    assert cache.offer(torch.arange(6), None).all()  # first image: every negative
    assert cache.needs_retraining()  # 6 > 3 added
    # scores in cache order: -1.2 stays (not < -1.2), -1.2001 goes
    evicted = cache.retrained(torch.tensor([-1.2, -1.2001, -5.0, 0.3, -1.0, -1.19999]))
    assert evicted == 2 and cache.keys.tolist() == [0, 3, 4, 5] and cache.num_added == 0
    # later images: only score > -1.0001 and not cached yet
    keys = torch.tensor([3, 10, 11, 12, 13])
    scores = torch.tensor([5.0, -1.0001, -1.00009, 0.0, -2.0])
    added = cache.offer(keys, scores)  # 11 and 12; 3 is cached, 10 is not > -1.0001
    assert added.tolist() == [False, False, True, True, False]
    assert cache.keys.tolist() == [0, 3, 4, 5, 11, 12] and not cache.needs_retraining()
    assert cache.alphas.tolist() == [0.0] * 6


def test_feature_store_shares_rows_and_compacts_in_place():
    live: set[int] = set()
    store = HalfStore(3, live=lambda: np.fromiter(live, np.int64, len(live)))
    store.add(np.array([-2, -1]), torch.tensor([[1.0, 2, 3], [4, 5, 6]]))  # positives
    store.add(torch.tensor([10, 11, 12, 13]), 10 * torch.arange(12.0).reshape(4, 3))
    live.update([-2, -1, 11, 13])
    assert store.rows(np.array([13, -2, 11])).tolist() == [5, 0, 3]
    assert store.compact() == 2 and store.keys.tolist() == [-2, -1, 11, 13]
    assert store.data[:, 0].tolist() == [1.0, 4.0, 30.0, 90.0]  # rows moved down, values kept
    assert store.rows(np.array([13])).tolist() == [3]
    with pytest.raises(KeyError):
        store.rows(np.array([12]))
    with pytest.raises(ValueError, match="increase"):
        store.add(np.array([5]), torch.zeros(1, 3))
    store.add(np.array([20]), torch.full((1, 3), 0.1))
    assert store.data[-1].tolist() == [np.float16(0.1)] * 3


def test_dcd_reads_float16_rows_in_place_exactly():
    every_half = np.arange(65536, dtype=np.uint16).view(np.float16)
    every_half = every_half[np.isfinite(every_half)][:, None]
    assert np.array_equal(half_scores(every_half, np.ones(1), 0.0), every_half[:, 0].astype(np.float64))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7)).astype(np.float16)
    y = np.where(x[:, 0] + 0.3 * rng.normal(size=60) > 0, 1.0, -1.0)
    rows = np.array([5, 3, 50, 7, 9, 11, 40, 41, 42, 0, 1, 2])
    w, b, _, _ = solve_dcd(x, y[rows], 0.2, 0.1, 10.0, 1e-6, rows=rows)
    w_ref, b_ref, _, _ = solve_dcd(np.ascontiguousarray(x[rows]), y[rows], 0.2, 0.1, 10.0, 1e-6)
    assert np.allclose(w, w_ref, atol=1e-9) and abs(b - b_ref) < 1e-9
    assert np.allclose(half_scores(x, w, b, rows), x[rows].astype(np.float64) @ w + b, atol=1e-12)


# --------------------------------------------------------------------------- box regression
def test_box_coder_round_trip_and_hand_example():
    windows = torch.tensor([[0.0, 0, 10, 10], [5.5, 3, 40, 90]])
    targets = torch.tensor([[5.0, 0, 15, 20], [0, 0, 50, 80]])
    deltas = encode_boxes(windows, targets)
    assert torch.allclose(deltas[0], torch.tensor([0.5, 0.5, 0.0, math.log(2)]))
    assert torch.allclose(decode_boxes(windows, deltas), targets, atol=1e-5)
    assert decode_boxes(windows[:0], deltas[:0]).shape == (0, 4)


def test_ridge_primal_and_dual_agree_and_recover_the_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(fit_ridge(x, x @ w, 1e-8), w, atol=1e-6)  # d <= n: primal
    wide = torch.randn(30, 300, generator=g, dtype=torch.float64)  # d > n: dual
    y = torch.randn(30, 4, generator=g, dtype=torch.float64)
    lam = 3.0
    primal = torch.linalg.solve(wide.T @ wide + lam * torch.eye(300, dtype=torch.float64), wide.T @ y)
    assert torch.allclose(fit_ridge(wide, y, lam), primal, atol=1e-8)


def test_box_regressor_learns_a_synthetic_shift():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(400, 8, generator=g)
    true = torch.randn(8, 4, generator=g) * 0.05
    windows = torch.tensor([[10.0, 20, 110, 220]]).repeat(400, 1)
    targets = decode_boxes(windows, (features @ true).double()).float()
    labels = torch.zeros(400, dtype=torch.int64)
    regressor = fit_box_regressor(features, windows, targets, labels, num_classes=2, feature_scale=1.0, lam=1e-6)
    assert bool(regressor.trained[0]) and not bool(regressor.trained[1])
    predicted = regressor.predict(features, windows, labels)
    assert torch.allclose(predicted, targets, atol=0.05)
    untouched = regressor.predict(features[:3], windows[:3], torch.ones(3, dtype=torch.int64))
    assert torch.equal(untouched, windows[:3])


# --------------------------------------------------------------------------- fine-tuning
def test_finetune_lowers_the_loss_and_resumes_to_the_same_state(train_cache, tmp_path):
    settings = FinetuneSettings(fc_dim=64, iterations=40, base_lr=0.01, lr_steps=(30,), batch_size=32, round_iterations=10)
    caches = open_caches([train_cache])
    windows = collect_training_windows(caches)
    feats, labels = _pool_rows(caches, windows, _draw_round(caches, windows, settings, round_index=99, iterations=4),
                               torch.device("cpu")).rows(slice(None))
    assert int((labels > 0).sum()) == 4 * 8  # exactly 25% foreground per minibatch

    straight = tmp_path / "straight"
    run_finetune([train_cache], straight, settings)
    head = load_head(straight)
    interrupted = tmp_path / "interrupted"
    first = run_finetune([train_cache], interrupted, settings, stop_after=20)
    assert first.iterations_run == 20 and not (interrupted / "head.npz").exists()
    second = run_finetune([train_cache], interrupted, settings)
    assert second.resumed_from == 20 and second.iterations_run == 20
    resumed = load_head(interrupted)
    for (name, a), (_, b) in zip(head.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name

    torch.manual_seed(0)
    fresh = SPPHead(head.in_dim, 64, 21, input_scale=float(head.input_scale)).eval()
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(head(feats.float()), labels) < loss(fresh(feats.float()), labels)
    log = json.loads((straight / "train_log.json").read_text())
    assert [r["iteration"] for r in log] == [10, 20, 30, 40]


# --------------------------------------------------------------------------- detect and the CLI
def test_per_class_nms_caps_each_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10.5], [50, 50, 60, 60], [100, 100, 110, 110], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([0, 0, 0, 0, 1])
    keep = _per_class_nms(boxes, scores, labels, 0.3, max_per_class=2)
    assert sorted(keep.tolist()) == [0, 2, 4]  # 1 suppressed by 0; 3 over the cap of 2 for class 0


def test_pipeline_cli_trains_detects_and_evaluate_reads_the_files(train_cache, test_cache, tmp_path, voc_root):
    runner = CliRunner()
    head, svm, dets = tmp_path / "head", tmp_path / "svm", tmp_path / "dets"
    r = runner.invoke(cli.main, ["-q", "finetune", "--cache", str(train_cache), "--out", str(head), "--fc-dim", "32",
                                 "--iterations", "20", "--round-iterations", "10", "--batch-size", "32"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli.main, ["-q", "train-svm", "--cache", str(train_cache), "--head", str(head), "--features", "fc7",
                                 "--bbox", "--C", "0.1", "--out", str(svm)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli.main, ["-q", "detect", "--cache", str(test_cache), "--svm", str(svm), "--bbox", "--out", str(dets)])
    assert r.exit_code == 0, r.output
    ids = FeatureCache(test_cache).image_ids
    assert sorted(p.stem for p in dets.glob("0*.npz")) == ids
    from_files = read_detections(dets, "x")
    from_json = read_detections(dets / "detections.json", "x")
    assert sum(len(d) for d in from_files.values()) == sum(len(d) for d in from_json.values()) > 0
    # the test split's cache was made with image set "x": evaluate against its 3 images
    test_list = tmp_path / "voc" / "VOC2007" / "ImageSets" / "Main"
    test_list.mkdir(parents=True)
    for sub in ("JPEGImages", "Annotations"):
        (tmp_path / "voc" / "VOC2007" / sub).symlink_to(voc_root / "VOC2007" / sub)
    (test_list / "x.txt").write_text("\n".join(ids) + "\n")
    r = runner.invoke(cli.main, ["evaluate", "--voc-root", str(tmp_path / "voc"), "--image-set", "x", "--detections", str(dets)])
    assert r.exit_code == 0, r.output
    assert "mAP" in r.output
    again = runner.invoke(cli.main, ["-q", "detect", "--cache", str(test_cache), "--svm", str(svm), "--bbox", "--out", str(dets)])
    assert again.exit_code == 0 and "0 image(s) computed" in again.output and "3 already done" in again.output
    png = tmp_path / "shown.png"
    r = runner.invoke(cli.main, ["show", "--detections", str(dets), "--voc-root", str(tmp_path / "voc"), "--image-set", "x",
                                 "--image", ids[0], "--out", str(png), "--threshold", "-10"])
    assert r.exit_code == 0, r.output
    import cv2

    assert cv2.imread(str(png)) is not None
    sheet = tmp_path / "sheet.png"
    r = runner.invoke(cli.main, ["show", "--detections", str(dets), "--voc-root", str(tmp_path / "voc"), "--image-set", "x",
                                 "--image", "first:3", "--columns", "2", "--out", str(sheet), "--threshold", "-10"])
    assert r.exit_code == 0, r.output
    assert r.output.count("detection(s) of") == 3 and "contact sheet of 3 images" in r.output
    assert cv2.imread(str(sheet)).shape[0] == 2 * 320 + 4  # 3 pictures, 2 per row: two rows of 320 px


def test_train_svm_refuses_fc_features_without_a_head(train_cache, tmp_path):
    r = CliRunner().invoke(cli.main, ["train-svm", "--cache", str(train_cache), "--features", "fc7", "--out", str(tmp_path / "s")])
    assert r.exit_code != 0 and "--head" in r.output


def test_truncated_svd_of_fc6_is_exact_at_full_rank_and_close_at_lower_rank():
    from spp_detect.head import truncate_fc

    torch.manual_seed(0)
    head = SPPHead(64, 32, 21).eval()
    x = torch.rand(10, 64)
    with torch.no_grad():
        exact = head.features(x, "fc7")
        full = truncate_fc(head, 31).features(x, "fc7")  # rank 31 of a 32 x 64 matrix
        assert torch.allclose(full, exact, atol=0.05)
        low = truncate_fc(head, 8).features(x, "fc7")
    assert low.shape == exact.shape and not torch.equal(low, exact)
    assert isinstance(head.fc6, torch.nn.Linear)  # the original head is untouched
    with pytest.raises(ValueError, match="rank must be"):
        truncate_fc(head, 64)


def test_detect_with_svd_rank_runs_and_scores_close_to_the_full_fc6(train_cache, test_cache, tmp_path):
    """``detect --svd-rank`` on a real cache (it crashed: fc6 is an ``nn.Sequential`` once
    truncated); at rank 31 of fc6's 32 the window scores stay close to the full head's, the
    detections keep their boxes, and a low rank moves the scores more."""
    from spp_detect.detect import prepare_scorer
    from svm.train import load_svm

    runner = CliRunner()
    head, svm = tmp_path / "head", tmp_path / "svm"
    r = runner.invoke(cli.main, ["-q", "finetune", "--cache", str(train_cache), "--out", str(head), "--fc-dim", "32",
                                 "--iterations", "20", "--round-iterations", "10", "--batch-size", "32"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli.main, ["-q", "train-svm", "--cache", str(train_cache), "--head", str(head), "--features", "fc7",
                                 "--C", "0.1", "--out", str(svm)])
    assert r.exit_code == 0, r.output
    found = {}
    for rank in ("0", "31"):
        out = tmp_path / f"dets-{rank}"
        r = runner.invoke(cli.main, ["-q", "detect", "--cache", str(test_cache), "--svm", str(svm), "--svd-rank", rank,
                                     "--score-threshold", "-100", "--out", str(out)])
        assert r.exit_code == 0, r.output + repr(r.exception)
        found[rank] = {i: np.load(out / f"{i}.npz") for i in FeatureCache(test_cache).image_ids}
    model = load_svm(svm)
    cache = FeatureCache(test_cache)
    worst = {}
    for rank in (31, 4):
        truncated = prepare_scorer(model, DetectSettings(svd_rank=rank))
        assert isinstance(truncated.head.fc6, torch.nn.Sequential) and isinstance(model.head.fc6, torch.nn.Linear)
        diffs = []
        for image_id in cache.image_ids:
            image = cache.load(image_id)
            full = window_scores(image, model.scores, "fc7", model.head)
            low = window_scores(image, truncated.scores, "fc7", truncated.head)
            diffs.append((float((full - low).abs().max()), float(full.max() - full.min())))
        worst[rank] = max(d for d, _ in diffs), max(d / spread for d, spread in diffs)
    assert worst[31][1] < 0.02 and worst[4][1] > worst[31][1], worst  # [1]: relative to the scores' range
    for image_id, full in found["0"].items():  # no box regression: a detection's box is its window's
        svd = found["31"][image_id]
        key = lambda d: {(int(c), *b.tolist()): s for b, s, c in zip(d["boxes"], d["scores"], d["labels"])}  # noqa: E731
        full_by_box, svd_by_box = key(full), key(svd)
        shared = full_by_box.keys() & svd_by_box.keys()
        assert len(shared) >= 0.9 * len(full_by_box) > 0
        moved = max(abs(full_by_box[k] - svd_by_box[k]) for k in shared)
        assert 0 < moved <= worst[31][0] + 1e-5  # the command scored with the truncated fc6, no worse than measured


def test_train_svm_mines_with_a_bf16_head_close_to_fp32_and_checks_the_setting(train_cache, tmp_path):
    """``train-svm --precision bf16``: fc6/fc7 in bfloat16 while mining gives SVMs whose
    scores track the float32 run's (same windows, same head), under another manifest key;
    the setting is refused for pooled features and for an unknown precision."""
    from svm.train import SVMSettings, load_svm

    runner = CliRunner()
    head = tmp_path / "head"
    r = runner.invoke(cli.main, ["-q", "finetune", "--cache", str(train_cache), "--out", str(head), "--fc-dim", "32",
                                 "--iterations", "20", "--round-iterations", "10", "--batch-size", "32"])
    assert r.exit_code == 0, r.output
    models = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"svm-{precision}"
        r = runner.invoke(cli.main, ["-q", "train-svm", "--cache", str(train_cache), "--head", str(head), "--features", "fc7",
                                     "--C", "0.1", "--precision", precision, "--out", str(out)])
        assert r.exit_code == 0, r.output + repr(r.exception)
        models[precision] = load_svm(out)
        assert json.loads((out / "manifest.json").read_text())["config"]["precision"] == precision
    image = FeatureCache(train_cache).load(FeatureCache(train_cache).image_ids[0])
    exact = window_scores(image, models["fp32"].scores, "fc7", models["fp32"].head)
    approx = window_scores(image, models["bf16"].scores, "fc7", models["bf16"].head)
    assert not torch.equal(models["fp32"].weights, models["bf16"].weights)  # it really mined in bf16
    spread = float(exact.max() - exact.min())
    assert float((exact - approx).abs().max()) < 0.1 * spread
    with pytest.raises(ValueError, match="--features pool has none"):
        SVMSettings(layer="pool", precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        SVMSettings(precision="fp16")
