"""A trained model as one folder (``spp_detect.model``): export, load, predict on plain
JPEGs, and the same detections as ``proposals -> extract -> detect`` through the cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import spp_detect
from proposals.run import ProposalSettings, run_proposals
from spp_detect.datasets import open_dataset
from spp_detect.detect import DetectSettings, run_detect
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.finetune import FinetuneSettings, run_finetune
from spp_detect.model import ModelError, PredictSettings, coco_results, export_model, load_model, run_predict
from spp_detect.stage_dir import read_manifest
from svm.train import SVMSettings, run_train_svm
from tests.conftest import SQUEEZENET_FILE, jittered_proposals, proposals_mat

pytestmark = pytest.mark.usefixtures("one_thread")

SCALES = (240,)
PHOTOS = ("000001.jpg", "000015.jpg", "000040.jpg")


@pytest.fixture(scope="module")
def trained(voc_root, tmp_path_factory):
    """The demo's stages on 6 trainval images (random windows for speed): extract ->
    finetune -> train-svm fc7 --bbox; the weights are a copy the tests may change."""
    root = tmp_path_factory.mktemp("trained")
    weights = root / SQUEEZENET_FILE.name
    shutil.copy(SQUEEZENET_FILE, weights)
    data = open_dataset(voc_root=voc_root, image_set="trainval", limit=6)
    settings = ExtractSettings(backbone="squeezenet1_0", weights=str(weights), scales=SCALES)
    windows = jittered_proposals(data.images, seed=None, copies=4)
    run_extract(data.images, proposals_mat(windows, root), root / "train", settings, image_set=data.name,
                device=torch.device("cpu"), classes=data.classes)
    run_finetune([root / "train"], root / "head", FinetuneSettings(fc_dim=32, iterations=20, round_iterations=10, batch_size=32))
    run_train_svm([root / "train"], root / "svm", SVMSettings(layer="fc7", C=0.1, bbox=True), head_folder=root / "head")
    return root, weights, settings


@pytest.fixture(scope="module")
def photos(voc_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        shutil.copy(voc_root / "VOC2007" / "JPEGImages" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def through_cache(trained, photos, tmp_path_factory):
    """``proposals -> extract -> detect`` on the plain photos, through stage folders."""
    root, _, settings = trained
    out = tmp_path_factory.mktemp("cache_route")
    data = open_dataset(images=[photos])
    run_proposals(data.images, out / "props", ProposalSettings(), {"image_set": data.name}, workers=1)
    run_extract(data.images, out / "props", out / "cache", settings, image_set=data.name,
                device=torch.device("cpu"), classes=data.classes)
    run_detect(out / "cache", root / "svm", out / "dets", DetectSettings(bbox=True))
    return out


def test_predict_gives_detects_boxes_and_writes_pictures_and_json(trained, photos, through_cache, tmp_path):
    root, weights, _ = trained
    folder = export_model(root / "svm", root / "train", tmp_path / "model", weights=weights)
    meta = json.loads((folder / "model.json").read_text())
    assert meta["classes"][:3] == ["aeroplane", "bicycle", "bird"] and meta["scales"] == [240] and meta["detect"]["bbox"]
    assert meta["weights"] == {"file": str(weights.resolve()), "sha256": read_manifest(root / "train")["config"]["weights"][7:]}

    model = load_model(folder)
    data = open_dataset(images=[photos])
    out = tmp_path / "pred"
    summary = run_predict(model, data.images, out, PredictSettings(threshold=-1.0))
    assert sorted(p.name for p in out.iterdir()) == ["000001.png", "000015.png", "000040.png", "detections.json",
                                                     "detections_info.json"]
    assert list(summary.seconds) == ["000001", "000015", "000040"] and all(s > 0 for s in summary.seconds.values())
    import cv2

    for image in data.images:
        picture = cv2.imread(str(out / f"{image.image_id}.png"))
        assert picture.shape == (image.height, image.width, 3)
    expected = []
    for image_id in ("000001", "000015", "000040"):
        cached = np.load(through_cache / "dets" / f"{image_id}.npz")
        prediction = model.predict(photos / f"{image_id}.jpg")
        assert np.array_equal(prediction.boxes.numpy(), cached["boxes"])
        assert np.array_equal(prediction.scores.numpy().astype(np.float64), cached["scores"])
        assert np.array_equal(prediction.labels.numpy(), cached["labels"])
        assert summary.detections[image_id] == len(cached["scores"]) > 0
        boxes = cached["boxes"].astype(np.float64)
        expected += [{"image_id": image_id, "category_id": int(label) + 1,
                      "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(score)}
                     for b, score, label in zip(boxes, cached["scores"], cached["labels"])]
    assert json.loads((out / "detections.json").read_text()) == expected


def test_a_changed_weights_file_is_refused(trained, tmp_path):
    root, weights, _ = trained
    changed = tmp_path / "changed.pth"
    shutil.copy(weights, changed)
    folder = export_model(root / "svm", root / "train", tmp_path / "model", weights=weights)
    with pytest.raises(ModelError, match="is not the weights file .* was extracted with"):
        export_model(root / "svm", root / "train", tmp_path / "other", weights=SQUEEZENET_FILE.parent / "mobilenet_v2-imagenet1001-coral.pth")
    with changed.open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError) as info:
        load_model(folder, weights=changed)
    assert str(info.value).startswith(f"the weights file {changed} changed since model {folder} was made (sha256 ")
    assert "restore that file" in str(info.value)


def test_a_model_with_its_weights_copied_moves_to_another_place(trained, voc_root, tmp_path):
    root, weights, _ = trained
    export_model(root / "svm", root / "train", tmp_path / "here", weights=weights, copy_weights=True)
    meta = json.loads((tmp_path / "here" / "model.json").read_text())
    assert meta["weights"]["file"] == f"weights/{weights.name}"
    shutil.move(tmp_path / "here", tmp_path / "there")  # e.g. rsync -a to another machine
    model = spp_detect.load_model(tmp_path / "there")
    image = voc_root / "VOC2007" / "JPEGImages" / "000015.jpg"
    windows = jittered_proposals(open_dataset(images=[image]).images, seed=None, copies=4)["000015"]
    moved = model.predict(image, proposals=windows)
    original = load_model(tmp_path / "there", weights=weights).predict(image, proposals=windows)
    assert moved.boxes.dtype == torch.float32 and moved.boxes.shape[1:] == (4,)
    assert torch.equal(moved.boxes, original.boxes) and torch.equal(moved.scores, original.scores)
    assert moved.class_names == [model.classes[i] for i in moved.labels.tolist()]
    assert coco_results("x", moved)[:1] == coco_results("x", original)[:1]
    with pytest.raises(FileNotFoundError, match="give its new place with --weights"):
        load_model(tmp_path / "there", weights=tmp_path / "nowhere.pth")


def test_export_refuses_a_cache_the_svms_were_not_trained_on(trained, through_cache, tmp_path):
    root, weights, _ = trained
    with pytest.raises(ModelError, match="is not one of the caches the SVMs in .* were trained on"):
        export_model(root / "svm", through_cache / "cache", tmp_path / "m", weights=weights)


def test_predict_keeps_what_it_did_before_a_broken_image_and_skip_bad_goes_on(trained, voc_root, tmp_path):
    from spp_detect.datasets.image_folder import PlainImage
    from spp_detect.images import ImageReadError

    root, weights, _ = trained
    model = load_model(export_model(root / "svm", root / "train", tmp_path / "model", weights=weights))
    broken = tmp_path / "broken.jpg"
    data = (voc_root / "VOC2007" / "JPEGImages" / "000015.jpg").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    images = [PlainImage("000001", voc_root / "VOC2007" / "JPEGImages" / "000001.jpg", 353, 500),
              PlainImage("broken", broken, 500, 375)]
    with pytest.raises(ImageReadError, match="broken.jpg"):
        run_predict(model, images, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000001.png", "detections.json", "detections_info.json"]
    kept = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert len(kept) > 0 and {e["image_id"] for e in kept} == {"000001"}
    summary = run_predict(model, images, tmp_path / "again", skip_bad=True)
    assert list(summary.seconds) == ["000001"] and [e.path.name for e in summary.bad] == ["broken.jpg"]
    assert json.loads((tmp_path / "again" / "detections.json").read_text()) == kept


def test_a_model_exported_with_bf16_fc_layers_predicts_as_detect_does_with_them(trained, through_cache, photos, tmp_path):
    from spp_detect.cache import FeatureCache

    root, weights, _ = trained
    settings = DetectSettings(bbox=True, precision="bf16")
    model = load_model(export_model(root / "svm", root / "train", tmp_path / "model", weights=weights, settings=settings))
    assert model.settings == settings and model.scorer.head.fc6.weight.dtype == torch.bfloat16
    run_detect(through_cache / "cache", root / "svm", tmp_path / "dets", settings)
    cache = FeatureCache(through_cache / "cache")
    for image_id in ("000001", "000040"):
        cached = np.load(tmp_path / "dets" / f"{image_id}.npz")
        prediction = model.predict(photos / f"{image_id}.jpg", proposals=cache.load(image_id, scales=()).boxes.numpy())
        assert np.array_equal(prediction.boxes.numpy(), cached["boxes"]) and len(cached["boxes"]) > 0
        assert np.array_equal(prediction.scores.numpy().astype(np.float64), cached["scores"])
        # the same model asked for fp32 scores its fc layers in float32 again
        exact = model.predict(photos / f"{image_id}.jpg", proposals=cache.load(image_id, scales=()).boxes.numpy(),
                              settings=DetectSettings(bbox=True))
        fp32 = np.load(through_cache / "dets" / f"{image_id}.npz")
        assert np.array_equal(exact.scores.numpy().astype(np.float64), fp32["scores"])
        assert not np.array_equal(fp32["scores"], cached["scores"])


def test_a_model_from_a_bf16_cache_predicts_with_the_bf16_trunk_as_detect_does(voc_root, photos, tmp_path):
    """``extract --precision bf16`` -> train-svm -> export: the model records the trunk's
    precision, and ``predict`` computes the maps in bfloat16 too, so its detections equal
    ``detect``'s through a bf16 cache of the same photo."""
    data = open_dataset(voc_root=voc_root, image_set="trainval", limit=4)
    settings = ExtractSettings(backbone="squeezenet1_0", weights=str(SQUEEZENET_FILE), scales=SCALES, precision="bf16")
    run_extract(data.images, proposals_mat(jittered_proposals(data.images, seed=None, copies=4), tmp_path / "p-train"),
                tmp_path / "train", settings, image_set=data.name, device=torch.device("cpu"), classes=data.classes)
    run_train_svm([tmp_path / "train"], tmp_path / "svm", SVMSettings(layer="pool", C=0.1))
    model = load_model(export_model(tmp_path / "svm", tmp_path / "train", tmp_path / "model", weights=SQUEEZENET_FILE))
    assert json.loads((tmp_path / "model" / "model.json").read_text())["precision"] == "bf16"
    assert next(model.trunk().parameters()).dtype == torch.bfloat16
    shots = open_dataset(images=[photos])
    image = next(im for im in shots.images if im.image_id == "000001")
    windows = jittered_proposals([image], seed=None, copies=4)
    run_extract([image], proposals_mat(windows, tmp_path / "p-photo"), tmp_path / "cache", settings, image_set=shots.name,
                device=torch.device("cpu"), classes=shots.classes)
    run_detect(tmp_path / "cache", tmp_path / "svm", tmp_path / "dets", DetectSettings(score_threshold=-100))
    cached = np.load(tmp_path / "dets" / "000001.npz")
    prediction = model.predict(image.path, proposals=windows["000001"],
                               settings=DetectSettings(score_threshold=-100))
    assert len(cached["scores"]) > 0 and np.array_equal(prediction.boxes.numpy(), cached["boxes"])
    assert np.array_equal(prediction.scores.numpy().astype(np.float64), cached["scores"])
