"""`spp-detect predict` and the own-data options on the command line: a model trained the
demo's way (proposals -> extract -> finetune -> train-svm --bbox, here on 4 images, 1 small
scale), exported, then run on 3 JPEGs; the same photos through proposals -> extract ->
detect give the same boxes."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner

import cli
from eval.coco import evaluate_coco_json
from eval.results import read_detections
from spp_detect.datasets import VOC_CLASSES
from tests.coco_data import RELABEL, THREE_CLASSES, write_coco
from tests.conftest import SQUEEZENET_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

PHOTOS = ("000001", "000015", "000040")


def _run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture(scope="module")
def demo(voc_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    weights = root / SQUEEZENET_FILE.name  # a copy the tests may change
    shutil.copy(SQUEEZENET_FILE, weights)
    photos = root / "photos"
    photos.mkdir()
    for image_id in PHOTOS:
        shutil.copy(voc_root / "VOC2007" / "JPEGImages" / f"{image_id}.jpg", photos / f"{image_id}.jpg")
    voc = ["--voc-root", voc_root, "--image-set", "trainval", "--limit", 4]
    extract = ["--weights", weights, "--scales", 240]
    _run("-q", "proposals", *voc, "--workers", 1, "--out", root / "ss-train")
    _run("-q", "extract", *voc, "--proposals", root / "ss-train", *extract, "--out", root / "feat-train")
    _run("-q", "finetune", "--cache", root / "feat-train", "--out", root / "head", "--fc-dim", 32, "--iterations", 20,
         "--round-iterations", 10, "--batch-size", 32)
    _run("-q", "train-svm", "--cache", root / "feat-train", "--head", root / "head", "--features", "fc7", "--bbox",
         "--C", 0.1, "--out", root / "svm")
    # the photos through the stage folders, as plain images
    _run("-q", "proposals", "--images", photos, "--workers", 1, "--out", root / "ss-photos")
    _run("-q", "extract", "--images", photos, "--proposals", root / "ss-photos", *extract, "--out", root / "feat-photos")
    _run("-q", "detect", "--cache", root / "feat-photos", "--svm", root / "svm", "--bbox", "--out", root / "dets")
    _run("export-model", "--svm", root / "svm", "--cache", root / "feat-train", "--weights", weights, "--out", root / "model")
    return root, weights, photos


def _entries(path):
    return sorted((e["image_id"], e["category_id"], tuple(e["bbox"]), e["score"]) for e in json.loads(path.read_text()))


def test_predict_writes_pictures_and_detects_json_with_per_image_times(demo, tmp_path):
    root, _, photos = demo
    out = tmp_path / "predicted"
    result = _run("predict", "--model", root / "model", photos, "--out", out, "--threshold", "-1")
    assert sorted(p.name for p in out.iterdir()) == ["000001.png", "000015.png", "000040.png", "detections.json",
                                                     "detections_info.json"]
    assert json.loads((out / "detections_info.json").read_text())["classes"] == list(VOC_CLASSES)
    for image_id in PHOTOS:
        assert re.search(rf"^  {image_id}: \d+ detections \(\d+ drawn\), \d+\.\d\d s$", result.output, re.M), result.output
    assert re.search(r"^predict: 3 image\(s\), \d+\.\d\d s/image, \d+ detections", result.output, re.M)
    expected = _entries(root / "dets" / "detections.json")
    assert len(expected) > 0 and _entries(out / "detections.json") == expected
    assert not (out / "manifest.json").exists()  # nothing but the pictures and the json


def test_evaluate_coco_json_on_the_command_line(demo, voc_root, tmp_path):
    root, _, photos = demo
    gt = write_coco(voc_root, list(PHOTOS), tmp_path / "photos.json")
    dets = root / "dets" / "detections.json"
    result = _run("evaluate", "--coco", "--coco-json", gt, "--images", photos, "--detections", dets, "--json", tmp_path / "c.json")
    expected = evaluate_coco_json(read_detections(dets, "photos", classes=VOC_CLASSES), gt)
    assert json.loads((tmp_path / "c.json").read_text())["stats"] == expected.stats
    assert "photos, 3 images" in result.output and f"ground truth of {gt}" in result.output
    result = _run("evaluate", "--coco-json", gt, "--images", photos, "--detections", dets)
    assert "11point AP, devkit rule" in result.output and re.search(r"^mAP\s+\d\.\d{4}$", result.output, re.M)
    refused = CliRunner().invoke(cli.main, ["evaluate", "--images", str(photos), "--detections", str(dets)])
    assert refused.exit_code == 2 and "evaluate needs ground truth" in refused.stderr
    three = write_coco(voc_root, list(PHOTOS), tmp_path / "three.json", RELABEL, THREE_CLASSES)
    other = CliRunner().invoke(cli.main, ["evaluate", "--coco", "--coco-json", str(three), "--images", str(photos),
                                          "--detections", str(dets)])
    assert other.exit_code == 1
    assert other.stderr.startswith(f"Error: {dets} holds detections of other classes than the ground truth "
                                   "(missing ['animal', 'vehicle'], extra ['aeroplane', 'bicycle', 'bird'")


def test_predict_refuses_a_changed_weights_file(demo, tmp_path):
    root, weights, photos = demo
    changed = tmp_path / weights.name
    shutil.copy(weights, changed)
    with changed.open("ab") as fh:
        fh.write(b"\0")
    result = CliRunner().invoke(cli.main, ["predict", "--model", str(root / "model"), str(photos),
                                                           "--weights", str(changed), "--out", str(tmp_path / "p")])
    assert result.exit_code == 1
    assert f"Error: the weights file {changed} changed since model {root / 'model'} was made" in result.stderr
    assert not (tmp_path / "p").exists()


def test_odd_annotations_on_the_command_line(voc_root, tmp_path):
    images = [{"id": 1, "file_name": "000015.jpg", "width": 500, "height": 375}]
    anns = [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [480, 10, 40, 30]},
            {"id": 6, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 0]}]
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "car"}]}))
    jpegs = voc_root / "VOC2007" / "JPEGImages"
    result = _run("proposals", "--coco-json", path, "--images", jpegs, "--workers", 1, "--max-boxes", 50, "--out", tmp_path / "ss")
    assert ("odd: 1 box(es) clipped to the image (annotation id 5), 1 zero-size box(es) dropped (annotation id 6), "
            "0 image(s) without objects") in result.stderr
    anns.append({"id": 7, "image_id": 1, "category_id": 4, "bbox": [1, 1, 5, 5]})
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "car"}]}))
    bad = CliRunner().invoke(cli.main, ["proposals", "--coco-json", str(path), "--images", str(jpegs),
                                                        "--out", str(tmp_path / "ss2")])
    assert bad.exit_code == 1
    assert bad.stderr == (f"Error: {path}: annotation id 7 of image '000015.jpg': unknown category_id 4 (categories: [1]); "
                          "fix or remove it, or rerun with --skip-bad to skip it\n")
    both = CliRunner().invoke(cli.main, ["proposals", "--coco-json", str(path), "--voc-root", str(voc_root),
                                                         "--out", str(tmp_path / "ss3")])
    assert both.exit_code == 2 and "not several" in both.stderr


def test_training_on_a_cache_without_annotations_is_refused(demo, tmp_path):
    root, _, _ = demo
    result = CliRunner().invoke(cli.main, ["finetune", "--cache", str(root / "feat-photos"), "--out", str(tmp_path / "h")])
    assert result.exit_code == 1
    assert f"{root / 'feat-photos'} holds images without annotations" in result.stderr


def test_show_draws_a_coco_images_detections_with_its_classes(demo, voc_root, tmp_path):
    import cv2

    root, _, photos = demo
    gt = write_coco(voc_root, list(PHOTOS), tmp_path / "photos.json")
    out = tmp_path / "shown.png"
    result = _run("show", "--detections", root / "dets" / "detections.json", "--coco-json", gt, "--images", photos, "--image", "000015",
                  "--threshold", "-10", "--out", out)
    assert re.search(r"^show: [1-9]\d* detection\(s\) of 000015 above -10 -> ", result.output, re.M)
    assert cv2.imread(str(out)).shape == (375, 500, 3)
