"""The trained SPP classifier: multi-size training (sizes per epoch, shared parameters), resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cli import main
from eval.voc_cls import voc_cls_ground_truth
from spp_detect.backbones import resolve_normalization
from spp_detect.classification.train import (
    TrainSettings,
    build_classifier,
    epoch_size,
    make_batches,
    multilabel_loss,
    predict,
    run_training,
)
from spp_detect.datasets.voc import VOC_CLASSES, read_voc
from spp_detect.image_trunk import load_image_rgb
from spp_detect.stage_dir import SettingsChanged

from tests.conftest import SQUEEZENET_FILE

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")
# Small inputs keep these tests fast; the logic is the paper's 224 / 180 at another scale.
TINY = TrainSettings(weights=str(SQUEEZENET_FILE), sizes=(64, 48), resize=80, hidden=16, epochs=3, batch_size=4, lr=0.01)


@pytest.fixture(scope="module")
def data(voc_root):
    images = read_voc(voc_root, "trainval")[:8]
    return [load_image_rgb(im.path) for im in images], voc_cls_ground_truth(images)


@pytest.fixture(scope="module")
def norm():
    return resolve_normalization("squeezenet1_0", SQUEEZENET_FILE)


def test_epoch_sizes_alternate_and_the_small_input_is_the_large_crop_resized(data):
    assert [epoch_size(e, (224, 180)) for e in range(5)] == [224, 180, 224, 180, 224]
    assert [epoch_size(e, (224,)) for e in range(3)] == [224, 224, 224]
    images, labels = data
    resized = [np.ascontiguousarray(im[:80, :100]) for im in images]
    single = TrainSettings(weights="none", sizes=(64,), resize=80, batch_size=4)
    for epoch, size in ((0, 64), (1, 48), (2, 64)):
        batches = list(make_batches(resized, labels, TINY, epoch))
        assert [b.shape for b, _ in batches] == [(4, 3, size, size)] * 2
        # The same epoch of a single-size run draws the same crops at 64 x 64: the 48 input is that crop resized.
        crops = list(make_batches(resized, labels, single, epoch))
        for (pixels, target), (crop, crop_target) in zip(batches, crops):
            assert torch.equal(target, crop_target)
            expected = F.interpolate(crop.float(), size=(size, size), mode="bilinear", align_corners=False)
            assert torch.equal(pixels, expected.round().clamp(0, 255).to(torch.uint8))


def test_multi_size_shares_every_parameter(data, norm, tmp_path):
    images, labels = data
    model = build_classifier(TINY, 20)
    params = model.trainable_parameters()
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in model.frozen.parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    for size in (64, 48):
        x = norm(torch.from_numpy(np.stack([im[:size, :size] for im in images[:4]])).permute(0, 3, 1, 2))
        model.zero_grad()
        logits = model(x)
        assert logits.shape == (4, 20)  # same head input length at both sizes
        multilabel_loss(logits, torch.from_numpy(labels[:4])).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), f"size {size}"
        assert all(p.grad is None for p in model.frozen.parameters())
    # A multi-size run trains that one parameter set: every trainable tensor moves, frozen ones do not.
    state = run_training(images, labels, VOC_CLASSES, tmp_path, TINY, norm, CPU, stop_after=2)
    assert state.sizes == [64, 48]
    after = dict(state.model.named_parameters())
    for name, p in after.items():
        assert torch.equal(p, before[name]) != p.requires_grad, name


def test_resumed_training_reaches_the_same_state(data, norm, tmp_path):
    images, labels = data
    straight = run_training(images, labels, VOC_CLASSES, tmp_path / "straight", TINY, norm, CPU)
    assert straight.sizes == [64, 48, 64] and straight.resumed_from == 0
    assert (tmp_path / "straight" / "model.pt").is_file()

    first = run_training(images, labels, VOC_CLASSES, tmp_path / "resumed", TINY, norm, CPU, stop_after=1)
    assert len(first.losses) == 1 and not (tmp_path / "resumed" / "model.pt").exists()
    resumed = run_training(images, labels, VOC_CLASSES, tmp_path / "resumed", TINY, norm, CPU)
    assert resumed.resumed_from == 1 and resumed.sizes == [64, 48, 64]
    assert resumed.losses == straight.losses
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "resumed" / "history.json").read_text())["sizes"] == [64, 48, 64]

    other = TrainSettings(**{**TINY.__dict__, "lr": 0.02})
    with pytest.raises(SettingsChanged, match="lr"):
        run_training(images, labels, VOC_CLASSES, tmp_path / "resumed", other, norm, CPU)

    scores = predict(resumed.model, norm, images[:3], "full", CPU, size=80, crop=64)
    assert scores.shape == (3, 20) and np.isfinite(scores).all()


def test_train_spp_classifier_cli_resumes(voc_root, tmp_path):
    out = tmp_path / "run"
    args = ["train-spp-classifier", "--voc-root", str(voc_root), "--limit", "6", "--weights", str(SQUEEZENET_FILE),
            "--sizes", "64,48", "--epochs", "2", "--batch-size", "3", "--hidden", "8", "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "epoch 2/2: size 48" in result.output and (out / "model.pt").is_file()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "trained 0 epoch(s) (resumed after epoch 2)" in again.output
    changed = CliRunner().invoke(main, [*args[:-4], "--lr", "0.5", "--out", str(out)])
    assert changed.exit_code == 1 and "lr: 0.01 -> 0.5" in changed.output
