"""A COCO dataset as users export them, through the command line (issue 31): results in the
dataset's own ids, evaluation that scores exactly the images it names, a renamed json, a
class without training examples, a stage that skipped everything.

The jsons are made here from real VOC2007 images (``tests.coco_data``): image ids from 0,
category ids 0, 3, 5, 8, 11 (not 1..K), ``furniture`` with objects in the test images only
(no training example), ``unused`` with no object at all (a Roboflow export's extra class).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from eval.coco import COCO_STAT_NAMES
from eval.results import ClassDetections
from eval.voc import evaluate_voc
from spp_detect.datasets import open_dataset
from spp_detect.detect import load_detections
from tests.coco_data import image_list, write_coco
from tests.conftest import SQUEEZENET_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

CATEGORIES = {"person": 0, "vehicle": 3, "unused": 5, "animal": 8, "furniture": 11}
CLASSES = ("person", "vehicle", "unused", "animal", "furniture")  # the categories in id order
RELABEL = {**{n: "animal" for n in ("bird", "cat", "cow", "dog", "horse", "sheep")},
           **{n: "vehicle" for n in ("aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train")},
           **{n: "furniture" for n in ("chair", "sofa", "diningtable")}, "person": "person"}
TRAIN, TEST = 6, 8  # trainval[:6] holds no chair, sofa or table; test[:8] does (000084)


def _run(*args, code: int = 0):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exit_code == code, result.output + result.stderr
    return result


def _by_hand(gt_json, results_json, image_ids=None) -> tuple[list[float], str]:
    """pycocotools as its README runs it, on the files as they are: ``(stats, printed summary)``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        dt = gt.loadRes(str(results_json))  # fails on ids the json does not have
        coco_eval = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = list(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats], printed.getvalue()


def _stats(summary_json) -> list[float]:
    """The 12 numbers of an ``evaluate --coco --json`` file, in pycocotools' order."""
    stats = json.loads(summary_json.read_text())["stats"]
    return [stats[name] for name in COCO_STAT_NAMES]


@pytest.fixture(scope="module")
def run(voc_root, tmp_path_factory):
    """proposals -> extract -> finetune -> train-svm -> detect (with and without box
    regression) -> combine on the command line, on the two jsons."""
    root = tmp_path_factory.mktemp("ids")
    jpegs = voc_root / "VOC2007" / "JPEGImages"
    train = write_coco(voc_root, image_list(voc_root, "trainval")[:TRAIN], root / "train.json", RELABEL, CATEGORIES,
                       first_id=0)
    test = write_coco(voc_root, image_list(voc_root, "test")[:TEST], root / "instances_val.json", RELABEL, CATEGORIES,
                      first_id=0)
    extract = ["--weights", SQUEEZENET_FILE, "--scales", 240]
    for split, gt in (("train", train), ("test", test)):
        data = ["--coco-json", gt, "--images", jpegs]
        _run("-q", "proposals", *data, "--workers", 1, "--max-boxes", 300, "--out", root / f"ss-{split}")
        _run("-q", "extract", *data, "--proposals", root / f"ss-{split}", *extract, "--out", root / f"feat-{split}")
    _run("-q", "finetune", "--cache", root / "feat-train", "--out", root / "head", "--fc-dim", 32, "--iterations", 20,
         "--round-iterations", 10, "--batch-size", 32)
    trained = _run("-q", "train-svm", "--cache", root / "feat-train", "--head", root / "head", "--features", "fc7",
                   "--bbox", "--C", 0.1, "--out", root / "svm")
    _run("-q", "detect", "--cache", root / "feat-test", "--svm", root / "svm", "--bbox", "--out", root / "dets")
    _run("-q", "detect", "--cache", root / "feat-test", "--svm", root / "svm", "--out", root / "dets-nobb")
    _run("-q", "combine", "--detections", root / "dets", "--detections", root / "dets-nobb", "--scores", "raw",
         "--out", root / "both")
    return root, jpegs, train, test, trained.output


def test_train_svm_says_which_classes_had_no_training_examples(run):
    *_, trained = run
    assert re.search(r"^  2 class\(es\) with no training examples \(no ground truth in the training caches\): "
                     r"unused, furniture; never detected", trained, re.M), trained


@pytest.mark.parametrize("folder", ["dets", "both"])
def test_detections_json_is_in_the_datasets_own_ids_and_evaluates_as_pycocotools_by_hand(run, folder, tmp_path):
    root, jpegs, _, test, _ = run
    results = root / folder / "detections.json"
    entries = json.loads(results.read_text())
    gt = json.loads(test.read_text())
    assert entries and {e["image_id"] for e in entries} <= {im["id"] for im in gt["images"]}
    assert {e["category_id"] for e in entries} <= {0, 3, 8}  # trained classes, the json's own category ids
    # against the source json unchanged: every image, then --limit 3 (exactly those 3 images)
    for limit, image_ids in ((None, None), (3, [0, 1, 2])):
        stats, printed = _by_hand(test, results, image_ids)
        out = tmp_path / f"coco-{limit}.json"
        result = _run("evaluate", "--coco", "--coco-json", test, "--images", jpegs, "--detections", results,
                      *(["--limit", limit] if limit else []), "--json", out)
        assert _stats(out) == stats
        assert printed.strip() in result.output
        assert f"instances_val, {limit or TEST} images (" in result.output
    assert stats != _by_hand(test, results)[0]  # the 3 images score otherwise than all 8


def test_predict_on_a_coco_json_writes_the_datasets_ids(run, voc_root, tmp_path):
    root, jpegs, _, test, _ = run
    _run("export-model", "--svm", root / "svm", "--cache", root / "feat-train", "--weights", SQUEEZENET_FILE,
         "--out", tmp_path / "model")
    _run("-q", "predict", "--model", tmp_path / "model", "--coco-json", test, jpegs, "--limit", 2, "--out", tmp_path / "p")
    results = tmp_path / "p" / "detections.json"
    entries = json.loads(results.read_text())
    assert entries and {e["image_id"] for e in entries} <= {0, 1} and {e["category_id"] for e in entries} <= {0, 3, 8}
    stats, printed = _by_hand(test, results, [0, 1])
    result = _run("evaluate", "--coco", "--coco-json", test, "--images", jpegs, "--limit", 2, "--detections", results,
                  "--json", tmp_path / "e.json")
    assert _stats(tmp_path / "e.json") == stats
    assert printed.strip() in result.output
    voc = write_coco(voc_root, image_list(voc_root, "test")[:1], tmp_path / "voc.json")  # VOC's 20 classes
    refused = _run("predict", "--model", tmp_path / "model", "--coco-json", voc, jpegs, "--out", tmp_path / "q", code=1)
    assert "Error: the model's classes differ from those of" in refused.stderr


def _class_detections(folder, classes):
    return load_detections(folder, classes)


def test_devkit_form_limit_scores_exactly_those_images_and_counts_the_rest(run, tmp_path):
    root, jpegs, _, test, _ = run
    dets = _class_detections(root / "dets", CLASSES)
    first = open_dataset(coco_json=test, images=[jpegs], limit=3)
    kept = {n: ClassDetections(*(x[np.isin(d.image_ids, [im.image_id for im in first.images])]
                                 for x in (d.image_ids, d.scores, d.boxes))) for n, d in dets.items()}
    left_out = sum(len(d) for d in dets.values()) - sum(len(d) for d in kept.values())
    expected = evaluate_voc(kept, first.images, classes=CLASSES)
    without = sum(all(im.image_id not in d.image_ids for d in kept.values()) for im in first.images)
    out = tmp_path / "voc.json"
    result = _run("evaluate", "--coco-json", test, "--images", jpegs, "--limit", 3, "--detections", root / "dets",
                  "--json", out)
    summary = json.loads(out.read_text())
    assert summary["num_images"] == 3 and summary["detections_left_out"] == left_out > 0
    assert summary["images_without_detections"] == without
    assert summary["map"] == pytest.approx(expected.map, abs=1e-12)
    assert (f"instances_val, 3 images ({without} without detections), {sum(len(d) for d in kept.values())} detections "
            f"({left_out} more, of images past --limit, left out)") in result.output


def test_evaluate_marks_classes_without_training_examples_and_what_the_map_counts(run, tmp_path):
    root, jpegs, _, test, _ = run
    out = tmp_path / "voc.json"
    result = _run("evaluate", "--coco-json", test, "--images", jpegs, "--detections", root / "dets", "--json", out)
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.split() and line.split()[0] in CLASSES}
    assert rows["furniture"].endswith("no training examples; counted in the mean (never detected: AP 0)")
    assert rows["unused"].endswith("no training examples; no test objects: left out of the mean")
    assert "no training examples" not in rows["person"]
    summary = json.loads(out.read_text())
    assert summary["untrained_classes"] == ["unused", "furniture"] and summary["ap"]["furniture"] == 0.0
    trained = [summary["ap"][n] for n in ("person", "vehicle", "animal")]
    assert summary["map"] == pytest.approx(np.mean(trained + [0.0]), abs=1e-12)
    assert summary["map_trained"] == pytest.approx(np.mean(trained), abs=1e-12)
    assert "  mAP over 4 of 5 classes: no test objects of unused" in result.output
    assert (f"  mAP counts 1 class(es) with no training examples (furniture); over the 3 trained classes with test "
            f"objects: {np.mean(trained):.4f}") in result.output
    coco = _run("evaluate", "--coco", "--coco-json", test, "--images", jpegs, "--detections", root / "dets")
    assert "  furniture: no training examples; counted in the mean" in coco.output


def test_a_renamed_json_still_reads_the_detect_folder_in_evaluate_and_show(run, tmp_path):
    root, jpegs, _, test, _ = run
    renamed = tmp_path / "renamed.json"
    shutil.copy(test, renamed)
    by_name = _run("evaluate", "--coco-json", test, "--images", jpegs, "--detections", root / "dets", "--json", tmp_path / "a")
    again = _run("evaluate", "--coco-json", renamed, "--images", jpegs, "--detections", root / "dets", "--json", tmp_path / "b")
    assert json.loads((tmp_path / "a").read_text())["ap"] == json.loads((tmp_path / "b").read_text())["ap"]
    assert "renamed, 8 images" in again.output and by_name.output.count("\n") == again.output.count("\n")
    shown = _run("show", "--detections", root / "dets", "--coco-json", renamed, "--images", jpegs, "--limit", 3,
                 "--threshold", -10, "--out", tmp_path / "sheet.png")
    assert re.search(r"^show: 3 images, \d+ detections drawn, \d+ correct$", shown.output, re.M), shown.output
    assert "contact sheet of 3 images" in shown.output
    dets = json.loads((root / "dets" / "detections.json").read_text())
    first = _run("show", "--detections", root / "dets" / "detections.json", "--coco-json", renamed, "--images", jpegs,
                 "--image", "000001", "--threshold", -10, "--top", 1000, "--out", tmp_path / "one.png")
    assert f"show: {sum(e['image_id'] == 0 for e in dets)} detection(s) of 000001 above -10 -> " in first.output


def test_a_stage_that_skipped_every_image_fails_naming_the_folder(run, voc_root, tmp_path):
    root, jpegs, train, _, _ = run
    wrong = tmp_path / "photos"  # an existing folder without the json's images
    wrong.mkdir()
    data = ["--coco-json", train, "--images", wrong, "--skip-bad"]
    result = _run("-q", "proposals", *data, "--workers", 1, "--out", tmp_path / "ss", code=1)
    assert f"Error: proposals: all {TRAIN} image(s) were skipped as bad, nothing was computed: is {wrong} the right folder?" \
        in result.stderr
    result = _run("-q", "extract", *data, "--proposals", root / "ss-train", "--weights", SQUEEZENET_FILE, "--scales", 240,
                  "--out", tmp_path / "feat", code=1)
    assert f"Error: extract: all {TRAIN} image(s) were skipped as bad" in result.stderr and str(wrong) in result.stderr
    for name in ("a.jpg", "b.jpg"):
        (wrong / name).write_bytes(b"not a jpeg")
    _run("export-model", "--svm", root / "svm", "--cache", root / "feat-train", "--weights", SQUEEZENET_FILE,
         "--out", tmp_path / "model")
    result = _run("-q", "predict", "--model", tmp_path / "model", wrong, "--skip-bad", "--out", tmp_path / "p", code=1)
    assert "Error: predict: all 2 image(s) were skipped as bad" in result.stderr and str(wrong) in result.stderr
    # an extract cache that holds no image (made by a run that skipped them all): detect says so
    empty = tmp_path / "feat-empty"
    shutil.copytree(root / "feat-test", empty, ignore=shutil.ignore_patterns("0*.npz"))
    result = _run("-q", "detect", "--cache", empty, "--svm", root / "svm", "--out", tmp_path / "d", code=1)
    assert f"Error: detect: {empty} holds no images, nothing to detect" in result.stderr
