"""classify-features -> train-classifier -> evaluate --voc2007-cls end to end on real VOC2007
images (small inputs to stay fast), and the image-folder (Caltech101-style) path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from eval.voc_cls import evaluate_voc_cls
from spp_detect.classification.features import load_features
from spp_detect.classification.svm import load_classifier
from spp_detect.datasets.voc import read_voc

from tests.conftest import SQUEEZENET_FILE


pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def features(voc_root, image_set, out, *extra):
    return invoke("classify-features", "--voc-root", voc_root, "--image-set", image_set, "--weights", SQUEEZENET_FILE,
                  "--size", "64", "--out", out, "--device", "cpu", *extra)


def test_features_svms_and_classification_ap_from_the_command_line(voc_root, tmp_path):
    for image_set in ("trainval", "test"):
        result = features(voc_root, image_set, tmp_path / image_set)
        assert result.exit_code == 0, result.output
        assert "200 image(s) computed" in result.output
    again = features(voc_root, "test", tmp_path / "test")
    assert again.exit_code == 0 and "0 image(s) computed, 200 already done" in again.output
    refused = features(voc_root, "test", tmp_path / "test", "--view", "crop")
    assert refused.exit_code == 1 and "view: 'full' -> 'crop'" in refused.output

    result = invoke("train-classifier", "--features", tmp_path / "trainval", "--out", tmp_path / "svm.npz",
                    "--score", tmp_path / "test", "--scores-out", tmp_path / "scores")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "scores" / "comp1_cls_test_tvmonitor.txt").is_file()

    out = tmp_path / "cls.json"
    result = invoke("evaluate", "--voc2007-cls", "--voc-root", voc_root, "--image-set", "test",
                    "--scores", tmp_path / "scores", "--json", out)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    test = load_features(tmp_path / "test")
    assert test.features.shape == (200, 512 * 50)
    expected = evaluate_voc_cls(load_classifier(tmp_path / "svm.npz").scores(test.features), read_voc(voc_root, "test"))
    assert summary["map"] == pytest.approx(expected.map, abs=1e-4)  # files keep 6 decimals
    assert 0.2 < summary["map"] < 1 and summary["protocol"] == "voc-cls" and "mAP" in result.output

    missing = invoke("evaluate", "--voc2007-cls", "--voc-root", voc_root)
    assert missing.exit_code == 2 and "--scores" in missing.output
    no_dets = invoke("evaluate", "--voc2007", "--voc-root", voc_root)
    assert no_dets.exit_code == 2 and "Missing option '--detections'" in no_dets.output


def test_plain_pooling_needs_the_crop_view(voc_root, tmp_path):
    result = features(voc_root, "test", tmp_path / "f", "--pooling", "plain", "--limit", "2")
    assert result.exit_code == 1 and "crop view" in result.output
    result = features(voc_root, "test", tmp_path / "p", "--pooling", "plain", "--view", "crop", "--limit", "2")
    assert result.exit_code == 0, result.output
    # 64 x 64 crop -> 3 x 3 SqueezeNet map -> 1 x 1 after the 3x3/2 pool5.
    assert load_features(tmp_path / "p").features.shape == (2, 512)


def test_image_folder_dataset_end_to_end(voc_root, tmp_path):
    # A Caltech101-style folder made of real VOC images: cats vs aeroplanes (links, not copies).
    images = read_voc(voc_root, "trainval")
    for name, label in (("cat", 7), ("aeroplane", 0)):
        (tmp_path / "data" / name).mkdir(parents=True)
        chosen = [im for im in images if (im.labels == label).all()][:6]
        assert len(chosen) == 6
        for im in chosen:
            (tmp_path / "data" / name / im.path.name).symlink_to(im.path)
    common = ["--image-folder", tmp_path / "data", "--train-per-class", "4", "--test-per-class", "2",
              "--weights", SQUEEZENET_FILE, "--size", "96", "--device", "cpu"]
    for split in ("train", "test"):
        result = invoke("classify-features", *common, "--split", split, "--out", tmp_path / split)
        assert result.exit_code == 0, result.output
    train, test = load_features(tmp_path / "train"), load_features(tmp_path / "test")
    assert train.classes == ("aeroplane", "cat") and len(train.image_ids) == 8 and len(test.image_ids) == 4
    assert not set(train.image_ids) & set(test.image_ids)
    assert (np.sort(test.labels, axis=1) == [-1, 1]).all()
    result = invoke("train-classifier", "--features", tmp_path / "train", "--out", tmp_path / "svm.npz",
                    "--score", tmp_path / "test", "--scores-out", tmp_path / "scores")
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and (tmp_path / "scores" / "comp1_cls_test_cat.txt").is_file()
