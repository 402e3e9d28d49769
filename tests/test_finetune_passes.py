"""Fine-tuning pooled a pass of rounds at a time (issue 30 item 3): a pass decodes each image
it draws from once, only at the scales its rows use, and gives the rows per-round pooling
gives, bit for bit; loading a cache image at some of its scales."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import spp_detect.finetune
from spp_detect.cache import FeatureCache
from spp_detect.datasets import read_voc
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.finetune import (FinetuneSettings, _draw_round, _pool_rows, _Rows, collect_training_windows,
                                 run_finetune)
from spp_detect.head import load_head
from spp_detect.window_features import open_caches
from tests.conftest import SQUEEZENET_FILE, jittered_proposals, proposals_mat

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
SETTINGS = FinetuneSettings(fc_dim=32, iterations=8, base_lr=0.01, lr_steps=(6,), batch_size=16, round_iterations=2,
                            seed=5)


@pytest.fixture(scope="module")
def cache(voc_root, tmp_path_factory):
    """4 trainval images at 2 scales, 20 random windows + jittered ground truth each."""
    images = read_voc(voc_root, "trainval")[:4]
    out = tmp_path_factory.mktemp("passes") / "cache"
    settings = ExtractSettings(weights=str(SQUEEZENET_FILE), scales=(240, 336))
    run_extract(images, proposals_mat(jittered_proposals(images, 20), Path(f"{out}-proposals")), out, settings,
                image_set="x", device=CPU)
    return out


def _reference_round_batches(caches, windows, settings, round_index, iterations, device, rank=0, world_size=1):
    """The per-round pooling fine-tuning did before passes (kept verbatim as the slow
    reference): draw the round, decode every drawn image at every scale, pool its rows."""
    rng = np.random.default_rng([settings.seed, round_index])
    per_fg = round(settings.batch_size * settings.fg_fraction)
    per_bg = settings.batch_size - per_fg
    fg = rng.integers(0, len(windows.fg_image), iterations * per_fg)
    bg = rng.integers(0, len(windows.bg_image), iterations * per_bg)
    image = np.concatenate([windows.fg_image[fg], windows.bg_image[bg]])
    window = np.concatenate([windows.fg_window[fg], windows.bg_window[bg]])
    label = np.concatenate([windows.fg_label[fg], np.zeros(len(bg), np.int64)])
    batches = np.arange(iterations)[:, None]
    order = np.concatenate(
        [batches * per_fg + np.arange(per_fg), len(fg) + batches * per_bg + np.arange(per_bg)], axis=1
    ).ravel()
    image, window, label = image[order], window[order], label[order]
    uniform = rng.random(len(image))
    mine = (batches * settings.batch_size + np.arange(rank, settings.batch_size, world_size)).ravel()
    image, window, label, uniform = image[mine], window[mine], label[mine], uniform[mine]
    feats = torch.empty((len(image), caches[0].feature_dim), dtype=torch.float16, device=device)
    for n in np.unique(image).tolist():
        cached = caches[windows.pairs[n][0]].load(windows.pairs[n][1])
        rows = np.nonzero(image == n)[0]
        cache = caches[windows.pairs[n][0]]
        idx = torch.from_numpy(window[rows])
        scale = None
        if settings.random_scale and len(cache.scales) > 1:
            pick = np.minimum((uniform[rows] * len(cache.scales)).astype(np.int64), len(cache.scales) - 1)
            scale = torch.from_numpy(pick)
        feats[torch.from_numpy(rows).to(device)] = cached.features(idx, device, scale_index=scale).half()
    return feats, torch.from_numpy(label).to(device)


# --------------------------------------------------------------------------- the cache, some scales
def test_load_at_some_scales_equals_the_full_load_at_those_scales(cache):
    features = FeatureCache(cache)
    for image_id in features.image_ids[:2]:
        full = features.load(image_id)
        every = torch.arange(len(full))
        for scales in [(0,), (1,), (), (1, 0)]:
            part = features.load(image_id, scales=scales)
            assert part.decoded_scales == tuple(sorted(scales))
            assert torch.equal(part.map_shapes, full.map_shapes) and part.channels == full.channels == 512
            for k, fmap in enumerate(full.maps):
                if k in scales:
                    assert part.maps[k].dtype == torch.float32 and torch.equal(part.maps[k], fmap)  # bit for bit
                    assert part.maps[k].permute(1, 2, 0).is_contiguous()  # decode_map's channels-last layout
                else:
                    assert part.maps[k] is None
            other = 1 - full.scale_index
            assert torch.equal(part.cells_at(every, other), full.cells_at(every, other))  # sizes without the maps
            for k in scales:
                at_k = torch.full((len(full),), k)
                assert torch.equal(part.features(every, scale_index=at_k), full.features(every, scale_index=at_k))
            assert part.to("cpu") is part
        with pytest.raises(ValueError, match=r"scale indices must be in \[0, 2\)"):
            features.load(image_id, scales=(2,))


def test_features_on_a_scale_not_decoded_raise(cache):
    features = FeatureCache(cache)
    image_id = features.image_ids[0]
    part = features.load(image_id, scales=(0,))
    own_one = torch.nonzero(part.scale_index == 1).flatten()
    assert len(own_one) and len(own_one) < len(part)
    with pytest.raises(ValueError, match=r"scale\(s\) \[1\], whose maps were not decoded \(decoded: \[0\]\)"):
        part.features(own_one)
    with pytest.raises(ValueError, match="not decoded"):
        part.features(torch.arange(3), scale_index=torch.tensor([0, 1, 0]))
    own_zero = torch.nonzero(part.scale_index == 0).flatten()
    assert torch.equal(part.features(own_zero), features.load(image_id).features(own_zero))
    with pytest.raises(ValueError, match="not decoded"):
        features.load(image_id, scales=()).features()


# --------------------------------------------------------------------------- passes
@pytest.mark.parametrize("random_scale", [True, False])
def test_a_pass_pools_the_rows_per_round_pooling_gives_bit_for_bit(cache, random_scale):
    caches = open_caches([cache])
    windows = collect_training_windows(caches)
    settings = replace(SETTINGS, random_scale=random_scale)
    for rank, world_size in ((0, 1), (1, 2)):
        drawn = [_draw_round(caches, windows, settings, r, 3, rank, world_size) for r in range(4)]
        stats: dict[str, float] = {}
        pooled = _pool_rows(caches, windows, _Rows.cat(drawn), CPU, stats)
        assert stats["images"] == 4 and stats["decode_seconds"] > 0
        start = 0
        for r in range(4):
            want, want_labels = _reference_round_batches(caches, windows, settings, r, 3, CPU, rank, world_size)
            got, got_labels = pooled.rows(slice(start, start + len(want)))  # as a round's minibatches read them
            assert torch.equal(got, want) and torch.equal(got_labels, want_labels), (rank, r)
            start += len(want)
        assert start == len(pooled.features) == 4 * 3 * len(range(rank, 16, world_size))
    scales = _Rows.cat(drawn).scale
    assert set(np.unique(scales).tolist()) == {0, 1}  # both scales pooled at: the test covers a real choice


def test_a_pass_decodes_only_the_scales_its_rows_use(cache, monkeypatch):
    caches = open_caches([cache])
    windows = collect_training_windows(caches)
    rows = _draw_round(caches, windows, SETTINGS, 0, 2)
    rows.scale[:] = 0  # every row pooled at scale 0: scale 1 is never decoded
    loaded = []
    load = FeatureCache.load
    monkeypatch.setattr(FeatureCache, "load", lambda self, image_id, scales=None: loaded.append(tuple(scales))
                        or load(self, image_id, scales))
    feats, _ = _pool_rows(caches, windows, rows, CPU).rows(slice(None))
    assert loaded and set(loaded) == {(0,)}
    assert len(loaded) == len(np.unique(rows.image))  # each image decoded once
    monkeypatch.undo()
    at_zero = FeatureCache(cache).load(windows.pairs[rows.image[0]][1])
    first = rows.image == rows.image[0]
    at_scale_0 = torch.zeros(int(first.sum()), dtype=torch.int64)
    want = at_zero.features(torch.from_numpy(rows.window[first]), scale_index=at_scale_0)
    assert torch.equal(feats[torch.from_numpy(first)], want.half())


def _round_bytes(settings: FinetuneSettings) -> int:
    return settings.round_iterations * settings.batch_size * 512 * 50 * 2  # fp16 rows of a round


def _finetune(cache, out, budget_rounds: int, monkeypatch, **kw):
    monkeypatch.setattr(spp_detect.finetune, "pass_budget", lambda device: budget_rounds * _round_bytes(SETTINGS))
    return run_finetune([cache], out, SETTINGS, **kw)


def _assert_same_head(a: Path, b: Path) -> None:
    x, y = load_head(a).state_dict(), load_head(b).state_dict()
    assert list(x) == list(y)
    for name in x:
        assert torch.equal(x[name], y[name]), name


def test_finetune_with_one_round_per_pass_or_all_in_one_and_resumed_mid_pass_are_equal(cache, tmp_path, monkeypatch):
    one = _finetune(cache, tmp_path / "one-round-passes", 1, monkeypatch)
    assert [(p["first_round"], p["rounds"]) for p in one.passes] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    whole = _finetune(cache, tmp_path / "one-pass", 100, monkeypatch)
    assert [(p["first_round"], p["rounds"]) for p in whole.passes] == [(0, 4)]  # never beyond the last round
    assert whole.passes[0]["rows"] == 8 * 16 and whole.passes[0]["images"] == 4
    _assert_same_head(tmp_path / "one-round-passes", tmp_path / "one-pass")
    # passes of 3 rounds, stopped after round 0 (the pass stops there too) and resumed: rounds 1-3
    resumed = tmp_path / "resumed"
    first = _finetune(cache, resumed, 3, monkeypatch, stop_after=2)
    assert [(p["first_round"], p["rounds"]) for p in first.passes] == [(0, 1)]
    second = _finetune(cache, resumed, 3, monkeypatch)
    assert second.resumed_from == 2 and [(p["first_round"], p["rounds"]) for p in second.passes] == [(1, 3)]
    _assert_same_head(resumed, tmp_path / "one-pass")
    assert (resumed / "train_log.json").read_bytes() == (tmp_path / "one-pass" / "train_log.json").read_bytes()
