"""`spp-detect evaluate` end to end on real VOC2007 test images, through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from eval.results import ClassDetections, write_coco_results, write_voc_results
from eval.voc import evaluate_voc
from spp_detect.datasets.voc import VOC_CLASSES, read_voc


@pytest.fixture(scope="module")
def images(voc_root):
    return read_voc(voc_root, "test")


def jittered_gt(images, seed: int = 0, sigma: float = 0.08, with_difficult: bool = True) -> dict[str, ClassDetections]:
    rng = np.random.default_rng(seed)
    detections = {}
    for label, name in enumerate(VOC_CLASSES):
        ids, boxes = [], []
        for image in images:
            mask = image.labels == label
            if not with_difficult:
                mask &= ~image.difficult
            for box in image.boxes[mask].astype(float):
                wh = np.tile(box[2:] - box[:2], 2)
                size = np.array([image.width, image.height] * 2, dtype=float)
                boxes.append(np.clip(box + rng.normal(0, sigma, 4) * wh, 0, size))
                ids.append(image.image_id)
        detections[name] = ClassDetections(ids, rng.random(len(ids)), np.array(boxes).reshape(-1, 4))
    return detections


def invoke(*args: str):
    return CliRunner().invoke(main, ["evaluate", *args], catch_exceptions=False)


def test_voc2007_devkit_files_json_and_plots(voc_root, images, tmp_path):
    detections = jittered_gt(images, sigma=0.25)
    write_voc_results(detections, tmp_path / "dets", "test")
    out = tmp_path / "eval.json"
    result = invoke("--voc2007", "--voc-root", str(voc_root), "--image-set", "test",
                    "--detections", str(tmp_path / "dets"), "--json", str(out), "--plots", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    expected = evaluate_voc(detections, images)
    assert set(summary["ap"]) == set(VOC_CLASSES)
    for name in VOC_CLASSES:
        assert summary["ap"][name] == pytest.approx(expected.ap[name], abs=1e-12)
    assert summary["map"] == pytest.approx(expected.map, abs=1e-12) and 0.3 < summary["map"] < 1
    assert summary["metric"] == "11point" and summary["rule"] == "devkit" and summary["num_images"] == 200
    assert "mAP" in result.output and "aeroplane" in result.output
    png = tmp_path / "plots" / "pr_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_voc_options_metric_rule_and_coco_json_input(voc_root, images, tmp_path):
    detections = jittered_gt(images, seed=1, sigma=0.25)
    path = write_coco_results(detections, tmp_path / "dets.json")
    out = tmp_path / "eval.json"
    result = invoke("--voc-root", str(voc_root), "--detections", str(path), "--metric", "area",
                    "--rule", "py-faster-rcnn", "--json", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    expected = evaluate_voc(detections, images, use_07_metric=False, rule="py-faster-rcnn")
    assert summary["metric"] == "area" and summary["rule"] == "py-faster-rcnn"
    assert summary["map"] == pytest.approx(expected.map, abs=1e-9)


def test_coco_perfect_detections_score_one(voc_root, images, tmp_path):
    perfect = {}
    for label, name in enumerate(VOC_CLASSES):  # exact non-difficult ground truth, distinct scores
        keep = [(i.image_id, b) for i in images for b in i.boxes[(i.labels == label) & ~i.difficult]]
        scores = np.arange(len(keep), 0, -1) / len(keep)
        perfect[name] = ClassDetections([k[0] for k in keep], scores, np.array([k[1] for k in keep]))
    path = write_coco_results(perfect, tmp_path / "perfect.json")
    out = tmp_path / "coco.json"
    result = invoke("--coco", "--voc-root", str(voc_root), "--detections", str(path), "--json", str(out),
                    "--plots", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["stats"]["AP"] == pytest.approx(1.0, abs=1e-12)
    assert summary["stats"]["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert all(v == pytest.approx(1.0) for v in summary["ap"].values())
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in result.output
    assert (tmp_path / "plots" / "pr_curves.png").is_file()
    # the same detections, devkit protocol
    voc = invoke("--voc-root", str(voc_root), "--detections", str(path), "--json", str(out))
    assert voc.exit_code == 0 and json.loads(out.read_text())["map"] == pytest.approx(1.0, abs=1e-12)


def test_readable_errors(voc_root, images, tmp_path):
    dets = tmp_path / "dets"
    write_voc_results(jittered_gt(images[:20]), dets, "test")
    # missing class file: a warning, AP 0 for that class
    (dets / "comp4_det_test_cow.txt").unlink()
    out = tmp_path / "eval.json"
    result = invoke("--voc-root", str(voc_root), "--detections", str(dets), "--json", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["ap"]["cow"] == 0.0
    # malformed line: file and line number
    (dets / "comp4_det_test_cat.txt").write_text("000001 0.5 1 1 10 10\n000001 0.5 1 1 10\n")
    result = invoke("--voc-root", str(voc_root), "--detections", str(dets))
    assert result.exit_code != 0 and "comp4_det_test_cat.txt:2: expected" in result.output
    # unknown image id
    (dets / "comp4_det_test_cat.txt").write_text("999999 0.5 1 1 10 10\n")
    result = invoke("--voc-root", str(voc_root), "--detections", str(dets))
    assert result.exit_code != 0 and "class 'cat'" in result.output and "'999999'" in result.output
    # wrong image set: no files at all
    result = invoke("--voc-root", str(voc_root), "--image-set", "trainval", "--detections", str(dets))
    assert result.exit_code != 0 and "no devkit result files" in result.output
    # VOC-only options with --coco
    result = invoke("--coco", "--voc-root", str(voc_root), "--detections", str(dets), "--metric", "area")
    assert result.exit_code == 2 and "--metric only apply to --voc2007" in result.output


def test_evaluate_registered_and_help():
    assert "evaluate" in main.commands
    result = CliRunner().invoke(main, ["evaluate", "--help"])
    assert result.exit_code == 0 and "--coco" in result.output and "--plots" in result.output
