"""Small objects (issue 31 items 4, 5): the proposals' minimum box size follows the image
size, and ``info`` reports recall of the objects under 20 px (also of a COCO json)."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
from click.testing import CliRunner

import cli
from proposals import ProposalSettings, load_proposals, propose, run_proposals
from proposals.selective_search import scaled_min_size
from spp_detect.datasets.voc import read_voc
from spp_detect.stage_dir import config_key
from tests.coco_data import image_list, voc_objects

LONGER_SIDE = 400  # the small images: VOC's 500 px images downscaled by 0.8


def _run(*args, code: int = 0):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exit_code == code, result.output + result.stderr
    return result


def test_the_minimum_box_size_follows_the_longer_side_between_faster_and_r_cnn():
    assert scaled_min_size(20, 500, 375) == 20 and scaled_min_size(20, 353, 500) == 20  # VOC: R-CNN's rule
    assert scaled_min_size(20, 1000, 800) == 20  # never raised
    assert scaled_min_size(20, 450, 300) == 18 and scaled_min_size(20, 400, 226) == 16
    assert scaled_min_size(20, 16, 12) == 16  # Faster R-CNN's floor: a thumbnail keeps no box
    assert scaled_min_size(20, 400, 300, reference=0) == 20 and scaled_min_size(30, 400, 300) == 24


def test_voc_size_images_get_the_boxes_of_the_fixed_rule(voc_root):
    image = read_voc(voc_root, "test", limit=1)[0]  # 000001, 353 x 500
    bgr = cv2.imread(str(image.path))
    assert np.array_equal(propose(bgr, "fast", 20, 2000, 0, None, 500), propose(bgr, "fast", 20, 2000, 0, None))


def _small_coco(voc_root, folder):
    """Every voc2007-mini image (trainval, then test) with a non-difficult object under 25 px,
    downscaled to a longer side of 400 px (PNG, lossless), and its COCO json, boxes scaled
    alike (VOC's 1-based inclusive pixels -> COCO's 0-based [x, y, w, h], times the factor)."""
    folder.mkdir()
    images, annotations = [], []
    for split in ("trainval", "test"):
        for image_id in image_list(voc_root, split):
            width, height, objects = voc_objects(voc_root, image_id)
            if not any(min(x2 - x1 + 1, y2 - y1 + 1) < 25 and not d for _, (x1, y1, x2, y2), d in objects):
                continue
            f = LONGER_SIDE / max(width, height)
            size = (round(width * f), round(height * f))
            fx, fy = size[0] / width, size[1] / height
            pixels = cv2.imread(str(voc_root / "VOC2007" / "JPEGImages" / f"{image_id}.jpg"))
            cv2.imwrite(str(folder / f"{image_id}.png"), cv2.resize(pixels, size, interpolation=cv2.INTER_AREA))
            images.append({"id": len(images), "file_name": f"{image_id}.png", "width": size[0], "height": size[1]})
            for name, (x1, y1, x2, y2), difficult in objects:
                box = [(x1 - 1) * fx, (y1 - 1) * fy, (x2 - x1 + 1) * fx, (y2 - y1 + 1) * fy]
                annotations.append({"id": len(annotations) + 1, "image_id": images[-1]["id"], "category_id": 1,
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": int(difficult)})
    path = folder.parent / "small.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "object"}]}))
    return path


def _small_recall(output: str) -> tuple[int, float]:
    """``(objects under 20 px, their recall at IoU 0.5 with every box)`` from ``info``'s lines."""
    head = re.search(r"^  recall of the (\d+) of them under 20 px wide or tall:\n    iou>=0.5  (.*)$", output, re.M)
    assert head, output
    return int(head.group(1)), float(head.group(2).split()[-1])


def test_info_reports_small_object_recall_and_the_default_reaches_half_of_them(voc_root, tmp_path):
    gt = _small_coco(voc_root, tmp_path / "small")
    data = ["--coco-json", gt, "--images", tmp_path / "small"]
    _run("-q", "proposals", *data, "--workers", 1, "--out", tmp_path / "ss")
    info = _run("info", tmp_path / "ss", *data).output
    assert re.search(r"^  recall of \d+ non-difficult objects in 37 images:$", info, re.M), info
    objects, recall = _small_recall(info)
    assert objects == 54 and recall >= 0.5, info  # the scaled minimum: 16 px on these images
    _run("-q", "proposals", *data, "--workers", 1, "--min-size-reference", 0, "--out", tmp_path / "ss-fixed")
    fixed = _small_recall(_run("info", tmp_path / "ss-fixed", *data).output)
    assert fixed[0] == objects and fixed[1] < 0.45 < recall  # R-CNN's fixed 20 px on every image


def test_a_folder_made_before_the_scaled_minimum_is_continued_under_its_fixed_rule(voc_root, tmp_path):
    images = [im for im in read_voc(voc_root, "test") if max(im.width, im.height) < 500][:2]  # 000157 (400 px), ...
    out = tmp_path / "props"
    run_proposals(images[:1], out, ProposalSettings(), {"image_set": "x"}, workers=1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"].pop("min_size_reference") == 500
    manifest["key"] = config_key(manifest["config"])  # as such a folder's manifest was
    (out / "manifest.json").write_text(json.dumps(manifest))
    summary = run_proposals(images, out, ProposalSettings(), {"image_set": "x"}, workers=1)
    assert (summary.done, summary.skipped) == (1, 1)
    assert json.loads((out / "manifest.json").read_text())["key"] == manifest["key"]  # the caches keyed by it stay valid
    second = images[1]
    assert np.array_equal(load_proposals(out)[second.image_id], propose(cv2.imread(str(second.path)), max_boxes=2000))
