"""combine: union of models' detections then NMS, score calibration, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from eval.results import ClassDetections
from spp_detect.combine import CalibrateSettings, ScoreCalibration, fit_logistic, union_nms
from spp_detect.datasets.voc import VOC_CLASSES
from spp_detect.detect import load_detections, write_image_detections
from spp_detect.stage_dir import open_stage_dir, settings_config


def _detect_folder(path, per_image, classes=VOC_CLASSES, image_set="test", svm=None):
    """A folder as `detect` writes it: per-image npz files and detections_info.json."""
    path.mkdir(parents=True)
    for image_id, (boxes, scores, labels) in per_image.items():
        write_image_detections(path, image_id, np.asarray(boxes, np.float32), np.asarray(scores), np.asarray(labels))
    info = {"classes": list(classes), "image_set": image_set}
    if svm is not None:
        info["svm"] = str(svm)
    (path / "detections_info.json").write_text(json.dumps(info))
    return path


DETS = {
    "000001": ([[0, 0, 10, 10], [50, 50, 80, 90], [0, 0, 10, 10]], [0.5, -0.2, 1.0], [3, 3, 7]),
    "000002": ([[5, 5, 40, 40]], [2.0], [14]),
}


def test_a_model_combined_with_itself_gives_its_own_detections(tmp_path):
    a = _detect_folder(tmp_path / "a", DETS)
    result = CliRunner().invoke(cli.main, ["combine", "--detections", str(a), "--detections", str(a), "--scores", "raw",
                                           "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    own = load_detections(a, VOC_CLASSES)
    combined = load_detections(tmp_path / "c", VOC_CLASSES)
    assert own.keys() == combined.keys()
    for name in own:
        for field in ("image_ids", "scores", "boxes"):
            x, y = getattr(own[name], field), getattr(combined[name], field)
            np.testing.assert_array_equal(np.sort(x, axis=0), np.sort(y, axis=0))
    assert (tmp_path / "c" / "comp4_det_test_cat.txt").is_file() and (tmp_path / "c" / "detections.json").is_file()


def test_disjoint_detections_are_all_kept_and_overlaps_keep_the_more_confident():
    a = {"cat": ClassDetections(np.array(["1", "1"]), np.array([0.9, 0.1]), np.array([[0, 0, 10, 10], [100, 100, 120, 120.0]]))}
    b = {"cat": ClassDetections(np.array(["1", "2"]), np.array([0.5, 0.7]), np.array([[0, 0, 10, 11], [0, 0, 10, 10.0]])),
         "dog": ClassDetections(np.array(["1"]), np.array([0.3]), np.array([[0, 0, 10, 10.0]]))}
    merged = union_nms([a, b], 0.3)
    ids, scores = merged["cat"].image_ids, merged["cat"].scores
    assert ids.tolist() == ["1", "1", "2"] and scores.tolist() == [0.9, 0.1, 0.7]  # b's 0.5 suppressed by a's 0.9
    assert merged["dog"].scores.tolist() == [0.3]  # another class is never suppressed


def test_inputs_with_other_classes_or_images_are_refused_by_name(tmp_path):
    a = _detect_folder(tmp_path / "a", DETS)
    fewer = _detect_folder(tmp_path / "b", DETS, classes=VOC_CLASSES[:19])
    other_images = _detect_folder(tmp_path / "c", {"000003": DETS["000002"]})
    r = CliRunner().invoke(cli.main, ["combine", "--detections", str(a), "--detections", str(fewer), "--scores", "raw",
                                      "--out", str(tmp_path / "o1")])
    assert r.exit_code != 0 and "other classes" in r.output and "tvmonitor" in r.output
    r = CliRunner().invoke(cli.main, ["combine", "--detections", str(a), "--detections", str(other_images), "--scores", "raw",
                                      "--out", str(tmp_path / "o2")])
    assert r.exit_code != 0 and "other images" in r.output and "000003" in r.output
    r = CliRunner().invoke(cli.main, ["combine", "--detections", str(a), "--detections", str(a), "--out", str(tmp_path / "o3")])
    assert r.exit_code != 0 and "calibrat" in r.output  # the default needs calibrations: say how to get them
    r = CliRunner().invoke(cli.main, ["combine", "--detections", str(a), "--out", str(tmp_path / "o4")])
    assert r.exit_code != 0 and "at least twice" in r.output


def test_calibration_recovers_a_known_logistic_map_and_is_applied(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.uniform(-3, 3, 40_000)
    correct = rng.uniform(0, 1, len(scores)) < 1 / (1 + np.exp(-(2.0 * scores - 1.0)))
    slope, intercept = fit_logistic(scores, correct)
    assert slope == pytest.approx(2.0, abs=0.08) and intercept == pytest.approx(-1.0, abs=0.06)
    with pytest.raises(ValueError, match="correct and wrong"):
        fit_logistic(scores[:10], np.ones(10, bool))

    calib = ScoreCalibration(torch.full((20,), 2.0, dtype=torch.float64), torch.full((20,), -1.0, dtype=torch.float64),
                             torch.ones(20, dtype=torch.bool), VOC_CLASSES)
    calib.save(tmp_path / "saved.npz")
    loaded = ScoreCalibration.load(tmp_path / "saved.npz")
    out = loaded.apply({"cat": ClassDetections(np.array(["1"]), np.array([0.5]), np.zeros((1, 4)))})
    assert out["cat"].scores[0] == pytest.approx(0.5)  # sigmoid(2 * 0.5 - 1)

    folder = tmp_path / "calibration"  # where combine looks: <svm>/calibration, a calibrate stage folder
    open_stage_dir(folder, "calibrate", {**settings_config(CalibrateSettings()), "model": "m"})
    calib.save(folder / "calibration.npz")
    a = _detect_folder(tmp_path / "a", DETS, svm=tmp_path)
    r = CliRunner().invoke(cli.main, ["combine", "--detections", str(a), "--detections", str(a), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    got = load_detections(tmp_path / "o", VOC_CLASSES)
    assert got["cat"].scores.max() == pytest.approx(1 / (1 + np.exp(-(2 * 1.0 - 1))))  # cat scored 1.0
