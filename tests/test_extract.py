"""The extract stage and its cache, on real VOC images with the real SqueezeNet weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from proposals.io import save_mat
from spp_detect.backbones import build_trunk, get_backbone, resolve_normalization
from spp_detect.cache import FeatureCache
from spp_detect.datasets import read_voc
from spp_detect.extract import ExtractSettings, assign_windows, run_extract
from spp_detect.image_trunk import conv_maps, load_image_rgb, prepare_trunk
from spp_detect.spp import spatial_pyramid_pool
from spp_detect.stage_dir import SettingsChanged, source_key
from tests.conftest import SQUEEZENET_FILE, proposals_mat

SCALES = (240, 336)  # small scales keep the tests fast; the code path is the same


def _random_proposals(images, count, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for im in images:
        size = np.array([im.width, im.height], dtype=np.float64)
        xy = rng.uniform(0, 1, (count, 2)) * (size - 20)  # top-left corners
        wh = 20 + rng.uniform(0, 1, (count, 2)) * (size - 20 - xy)  # at least 20 px, inside
        boxes = np.concatenate([xy, xy + wh], axis=1)
        out[im.image_id] = boxes.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def test_images(voc_root):
    return read_voc(voc_root, "test")[:3]


def _run(images, proposals, out, image_set="test", force=False, **kw):
    settings = ExtractSettings(**{"backbone": "squeezenet1_0", "weights": str(SQUEEZENET_FILE), "scales": SCALES, **kw})
    return run_extract(
        images, proposals_mat(proposals, Path(f"{out}-proposals")) if isinstance(proposals, dict) else proposals, out,
        settings, image_set=image_set,
        device=torch.device("cpu"), force=force,
    )


def test_cached_features_equal_pooling_the_fresh_conv_map(tmp_path, test_images):
    proposals = _random_proposals(test_images, 150)
    summary = _run(test_images, proposals, tmp_path / "feat")
    assert summary.done == 3 and summary.windows == 450 + sum(len(im.boxes) for im in test_images)
    cache = FeatureCache(tmp_path / "feat")
    assert cache.image_ids == sorted(im.image_id for im in test_images)

    spec = get_backbone("squeezenet1_0")
    trunk = prepare_trunk(build_trunk("squeezenet1_0", SQUEEZENET_FILE), torch.device("cpu"))
    norm = resolve_normalization("squeezenet1_0", SQUEEZENET_FILE)
    for im in test_images:
        cached = cache.load(im.image_id)
        pixels = load_image_rgb(im.path)
        fresh = conv_maps(trunk, norm, pixels, SCALES, torch.device("cpu"))
        boxes = torch.cat([torch.tensor(im.boxes), torch.tensor(proposals[im.image_id])])
        scale_index, cells = assign_windows(boxes, im.width, im.height, SCALES, spec, [m.shape[1:] for m in fresh])
        assert torch.equal(cached.boxes, boxes) and torch.equal(cached.cells, cells)
        assert torch.equal(cached.scale_index, scale_index)
        assert cached.is_gt.tolist() == [True] * len(im.boxes) + [False] * 150
        expected = torch.empty_like(cached.features())
        for k, fmap in enumerate(fresh):
            rows = scale_index == k
            expected[rows] = spatial_pyramid_pool(fmap, cells[rows])
        got = cached.features()
        # the cache holds fp16: pooled values are the fp16 rounding of the true max
        assert torch.equal(got, expected.half().float())
        assert float(((got - expected).abs() / expected.abs().clamp(min=1e-3)).max()) <= 2.0**-11
        batches = list(cached.iter_features(batch_size=64))
        assert torch.equal(torch.cat([f for _, f in batches]), got)
        assert torch.equal(torch.cat([i for i, _ in batches]), torch.arange(len(cached)))


def test_rerun_skips_and_changed_setting_is_refused_by_name(tmp_path, test_images):
    images = test_images[:1]
    proposals = _random_proposals(images, 20)
    out = tmp_path / "feat"
    _run(images, proposals, out)
    assert _run(images, proposals, out).skipped == 1
    with pytest.raises(SettingsChanged, match=r"scales: \[240, 336\] -> \[240\]"):
        _run(images, proposals, out, scales=(240,))
    with pytest.raises(SettingsChanged, match=r"backbone: 'squeezenet1_0' -> 'mobilenet_v2'"):
        _run(images, proposals, out, backbone="mobilenet_v2", weights="none")
    forced = _run(images, proposals, out, scales=(240,), force=True)
    assert forced.done == 1 and FeatureCache(out).scales == (240,)


def test_image_with_empty_proposals_still_works(tmp_path, test_images):
    image = test_images[0]
    _run([image], {image.image_id: np.zeros((0, 4), np.float32)}, tmp_path / "feat")
    cached = FeatureCache(tmp_path / "feat").load(image.image_id)
    assert len(cached) == len(image.boxes) and cached.is_gt.all()
    assert cached.features().shape == (len(image.boxes), 512 * 50)
    assert cached.features(torch.zeros(0, dtype=torch.int64)).shape == (0, 512 * 50)


def _cli_args(voc_root, proposals, out):
    return [
        "extract", "--voc-root", str(voc_root), "--image-set", "test", "--proposals", str(proposals),
        "--weights", str(SQUEEZENET_FILE), "--scales", "480,688", "--out", str(out),
    ]


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, voc_root):
    # a VOC tree with 6 test images (the real files, linked), proposals as an R-CNN .mat
    ids = [im.image_id for im in read_voc(voc_root, "test")[:6]]
    root = tmp_path / "voc" / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for sub in ("JPEGImages", "Annotations"):
        (root / sub).symlink_to(voc_root / "VOC2007" / sub)
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    images = read_voc(tmp_path / "voc", "test")
    mat = save_mat(tmp_path / "ss.mat", _random_proposals(images, 100))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *_cli_args(tmp_path / "voc", mat, killed)],
        cwd=Path(cli.__file__).parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not list(killed.glob("0*.npz")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(killed.glob("0*.npz")))
    assert 1 <= done_before < len(ids), "the run was not interrupted mid-way"

    result = CliRunner().invoke(cli.main, _cli_args(tmp_path / "voc", mat, killed))
    assert result.exit_code == 0, result.output
    assert f"{done_before} already cached" in result.output
    fresh = tmp_path / "fresh"
    assert CliRunner().invoke(cli.main, _cli_args(tmp_path / "voc", mat, fresh)).exit_code == 0

    a, b = FeatureCache(killed), FeatureCache(fresh)
    assert a.image_ids == b.image_ids == sorted(ids)
    assert a.key == b.key == source_key(killed)
    for image_id in ids:
        x, y = a.load(image_id), b.load(image_id)
        assert torch.equal(x.cells, y.cells) and torch.equal(x.features(), y.features())


def test_cli_refuses_changed_settings_naming_them(tmp_path, voc_root):
    images = read_voc(voc_root, "test")
    mat = save_mat(tmp_path / "ss.mat", _random_proposals(images, 5))
    out = tmp_path / "feat"
    _run(images[:1], mat, out, image_set="test", scales=(480, 688))
    args = _cli_args(voc_root, mat, out)
    args[args.index("480,688")] = "688"
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code != 0
    assert "scales: [480, 688] -> [688]" in result.output and "--force" in result.output




def test_bf16_extract_pools_the_bf16_trunks_maps_close_to_fp32(tmp_path, test_images):
    """``extract --precision bf16``: the cache holds the pooling of a bfloat16 trunk's maps
    (as :func:`conv_maps` computes them, exactly, through the float16 storage), close to the
    float32 cache's, under another key; an unknown precision is refused by name."""
    from spp_detect.stage_dir import BadSetting

    images = test_images[:1]
    proposals = _random_proposals(images, 30)
    _run(images, proposals, tmp_path / "fp32")
    _run(images, proposals, tmp_path / "bf16", precision="bf16")
    exact, rounded = FeatureCache(tmp_path / "fp32"), FeatureCache(tmp_path / "bf16")
    assert exact.key != rounded.key and rounded.manifest["config"]["precision"] == "bf16"
    trunk = prepare_trunk(build_trunk("squeezenet1_0", SQUEEZENET_FILE), torch.device("cpu"), "bf16")
    assert next(trunk.parameters()).dtype == torch.bfloat16
    norm = resolve_normalization("squeezenet1_0", SQUEEZENET_FILE)
    im = images[0]
    fresh = conv_maps(trunk, norm, load_image_rgb(im.path), SCALES, torch.device("cpu"))
    assert all(m.dtype == torch.float32 for m in fresh)
    cached = rounded.load(im.image_id)
    expected = torch.empty_like(cached.features())
    for k, fmap in enumerate(fresh):
        rows = cached.scale_index == k
        expected[rows] = spatial_pyramid_pool(fmap, cached.cells[rows])
    assert torch.equal(cached.features(), expected.half().float())
    a, b = exact.load(im.image_id).features(), cached.features()
    assert not torch.equal(a, b)
    assert float((a - b).norm() / a.norm()) < 0.05  # bf16 rounding through 8 fire modules: a few %
    with pytest.raises(BadSetting, match="precision"):
        ExtractSettings(precision="fp16")
