"""Training the trunk through SPP (finetune --train-from): the pooling's forward and
gradient, the image-centric minibatches, resuming, and the fine-tuned trunk travelling
with the head through extract, train-svm, detect, export-model and predict."""

from __future__ import annotations

from pathlib import Path
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from proposals.io import save_mat
from spp_detect.backbones import build_trunk
from spp_detect.cache import FeatureCache
from spp_detect.conv_finetune import image_minibatch, load_trunk_record, trunk_layer_index
from spp_detect.datasets import read_voc
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.finetune import FinetuneSettings, run_finetune
from spp_detect.image_trunk import conv_maps, load_image_rgb, prepare_trunk
from spp_detect.backbones import resolve_normalization
from spp_detect.spp import spatial_pyramid_pool
from spp_detect.windows import scale_factors, windows_to_cells
from svm.train import SVMSettings, run_train_svm
from tests.conftest import SQUEEZENET_FILE, jittered_proposals, proposals_mat

SCALES = (240,)
CONV = dict(fc_dim=32, iterations=4, base_lr=0.001, lr_steps=(3,), batch_size=32, round_iterations=2,
            train_from="fire8", images_per_batch=2)


@pytest.fixture(scope="module")
def images(voc_root):
    return read_voc(voc_root, "trainval")[:3]


@pytest.fixture(scope="module")
def proposals(images):
    return jittered_proposals(images, 30)


@pytest.fixture(scope="module")
def caches(images, proposals, tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    out = []
    for flip in (False, True):
        settings = ExtractSettings(backbone="squeezenet1_0", weights=str(SQUEEZENET_FILE), scales=SCALES, flip=flip)
        folder = root / ("feat-flip" if flip else "feat")
        run_extract(images, proposals_mat(proposals, Path(f"{folder}-proposals")), folder, settings, image_set="trainval",
                    device=torch.device("cpu"))
        out.append(folder)
    return out


@pytest.fixture(scope="module")
def conv_head(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("convhead") / "head"
    run_finetune(caches, out, FinetuneSettings(**CONV), weights=SQUEEZENET_FILE)
    return out


def _real_map(image, scale=240):
    trunk = prepare_trunk(build_trunk("squeezenet1_0", SQUEEZENET_FILE), torch.device("cpu"))
    norm = resolve_normalization("squeezenet1_0", SQUEEZENET_FILE)
    (fmap,) = conv_maps(trunk, norm, load_image_rgb(image.path), [scale], torch.device("cpu"))
    return fmap


def test_trainable_pooling_equals_the_extract_pooling_bit_for_bit(images, proposals):
    """The autograd path (roi_pool) pools exactly the CPU kernel's values on a real map."""
    image = images[0]
    fmap = _real_map(image)
    boxes = torch.from_numpy(proposals[image.image_id])
    factors = scale_factors(image.width, image.height, (240,)).expand(len(boxes))
    size = torch.tensor([fmap.shape[1:]]).expand(len(boxes), 2)
    cells = windows_to_cells(boxes, factors, 16, 17.0, size)
    kernel = spatial_pyramid_pool(fmap, cells)  # no grad: the numba kernel extract and detect use
    trainable = fmap.clone().requires_grad_(True)
    pooled = spatial_pyramid_pool(trainable, cells)
    assert pooled.requires_grad
    assert torch.equal(pooled.detach(), kernel)
    pooled.sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0


def test_trainable_pooling_gradient_matches_float64_reference():
    """gradcheck on a small float64 map with distinct values (max pooling is smooth there)."""
    torch.manual_seed(0)
    fmap = torch.randperm(3 * 7 * 9, dtype=torch.float64).reshape(3, 7, 9).div(10).requires_grad_(True)
    cells = torch.tensor([[0, 0, 8, 6], [1, 2, 5, 4], [3, 0, 3, 6], [2, 1, 7, 5]])
    assert torch.autograd.gradcheck(lambda m: spatial_pyramid_pool(m, cells), (fmap,), eps=1e-6, atol=1e-8)


def test_minibatch_is_image_centric_and_seeded():
    fg = [np.arange(5), np.arange(40), np.arange(2)]
    bg = [np.arange(5, 100), np.arange(40, 45), np.arange(2, 3)]
    labels = [np.ones(5, np.int64), np.full(40, 3), np.full(2, 7)]
    first = image_minibatch(fg, bg, labels, 0, 0, 2, 64, 0.25, (480, 688))
    again = image_minibatch(fg, bg, labels, 0, 0, 2, 64, 0.25, (480, 688))
    assert [b.pair for b in first] == [b.pair for b in again]
    assert all(np.array_equal(a.window, b.window) for a, b in zip(first, again))
    seen = [b.pair for i in range(3) for b in image_minibatch(fg, bg, labels, i, 0, 1, 64, 0.25, (480,))]
    assert sorted(seen) == [0, 1, 2]  # one epoch visits every image once
    for b in first:
        fg_count = int((b.label > 0).sum())
        assert fg_count == min(16, len(fg[b.pair]))  # 25% of 64, or all the image has
        assert len(b.window) == fg_count + min(64 - fg_count, len(bg[b.pair]))
        assert len(set(b.window.tolist())) == len(b.window)  # without replacement
        assert b.scale in (480, 688)


def test_layer_names():
    assert trunk_layer_index("squeezenet1_0", "fire5", 13) == 7
    assert trunk_layer_index("squeezenet1_0", "12", 13) == 12
    with pytest.raises(ValueError, match="fire2 .*fire9|names: conv1"):
        trunk_layer_index("squeezenet1_0", "fire10", 13)


def test_conv_finetune_trains_the_trunk_and_resumes_exactly(caches, conv_head, tmp_path):
    record = load_trunk_record(conv_head)
    assert record is not None and record.train_from == "fire8" and record.input_norm == "caffe-bgr"
    trained = torch.load(record.path, weights_only=True)
    original = torch.load(SQUEEZENET_FILE, weights_only=True)
    assert set(trained) == set(original)
    # layers before fire8 are frozen, fire8 on are trained
    assert torch.equal(trained["features.9.squeeze.weight"], original["features.9.squeeze.weight"])
    assert not torch.equal(trained["features.10.squeeze.weight"], original["features.10.squeeze.weight"])
    assert not torch.equal(trained["features.12.expand3x3.weight"], original["features.12.expand3x3.weight"])
    log = json.loads((conv_head / "train_log.json").read_text())
    assert [r["iteration"] for r in log] == [2, 4]
    # stopped after the first round and resumed: the same trunk, bit for bit
    resumed = tmp_path / "resumed"
    run_finetune(caches, resumed, FinetuneSettings(**CONV), weights=SQUEEZENET_FILE, stop_after=2)
    assert (resumed / "checkpoint.npz").is_file() and not (resumed / "trunk.pth").exists()
    summary = run_finetune(caches, resumed, FinetuneSettings(**CONV), weights=SQUEEZENET_FILE)
    assert summary.resumed_from == 2 and summary.iterations_run == 2 and summary.seconds_per_iteration > 0
    assert (resumed / "train_log.json").read_bytes() == (conv_head / "train_log.json").read_bytes()
    again = torch.load(load_trunk_record(resumed).path, weights_only=True)  # torch.save's file carries a random id
    assert all(torch.equal(again[k], trained[k]) for k in trained)


def test_conv_finetune_needs_the_weights_file_of_the_caches(caches, tmp_path):
    with pytest.raises(ValueError, match="--weights FILE"):
        run_finetune(caches, tmp_path / "h", FinetuneSettings(**CONV))
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 for k, v in torch.load(SQUEEZENET_FILE, weights_only=True).items()}, other)
    with pytest.raises(ValueError, match="is not the weights file"):
        run_finetune(caches, tmp_path / "h2", FinetuneSettings(**CONV), weights=other)


def test_fine_tuned_trunk_travels_with_the_head(images, proposals, caches, conv_head, tmp_path):
    """extract --head computes caches with the trained trunk; a cache of the ImageNet trunk
    is refused by that head (naming both); train-svm, detect, export-model, predict work."""
    runner = CliRunner()
    props = save_mat(tmp_path / "props.mat", proposals)
    voc = str(images[0].path.parents[1].parent)
    feat = tmp_path / "feat-ft"
    result = runner.invoke(cli.main, ["extract", "--voc-root", voc, "--image-set", "trainval", "--limit", "3",
                                      "--proposals", str(props), "--head", str(conv_head), "--scales", "240",
                                      "--out", str(feat)])
    assert result.exit_code == 0, result.output
    cache = FeatureCache(feat)
    record = load_trunk_record(conv_head)
    assert cache.weights == record.identity and cache.manifest["config"]["input_norm"] == "caffe-bgr"
    assert cache.key != FeatureCache(caches[0]).key
    # the ImageNet-trunk cache is refused by the fine-tuned head, naming the difference
    with pytest.raises(ValueError, match="extract --head"):
        run_train_svm([caches[0]], tmp_path / "svm-bad", SVMSettings(layer="fc7"), head_folder=conv_head)
    svm = tmp_path / "svm"
    run_train_svm([feat], svm, SVMSettings(layer="fc7", bbox=False), head_folder=conv_head)
    dets = tmp_path / "dets"
    result = runner.invoke(cli.main, ["detect", "--cache", str(feat), "--svm", str(svm), "--out", str(dets)])
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "model"
    result = runner.invoke(cli.main, ["export-model", "--svm", str(svm), "--cache", str(feat), "--weights",
                                      str(record.path), "--out", str(model_dir)])
    assert result.exit_code == 0, result.output
    from spp_detect.model import load_model

    model = load_model(model_dir)
    pixels = load_image_rgb(images[0].path)
    predicted = model.predict(pixels, proposals[images[0].image_id])
    cached = np.load(dets / f"{images[0].image_id}.npz")
    assert np.allclose(np.sort(predicted.scores.numpy()), np.sort(cached["scores"]), atol=1e-3)
