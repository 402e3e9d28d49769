"""eval.coco: VOC ground truth as COCO, and pycocotools' numbers on known detections."""

from __future__ import annotations

import numpy as np
import pytest

from eval.coco import COCO_STAT_NAMES, evaluate_coco, voc_to_coco
from eval.results import ClassDetections, DetectionsError
from spp_detect.datasets.voc import VOC_CLASSES, read_voc


@pytest.fixture(scope="module")
def images(voc_root):
    return read_voc(voc_root, "test")[:60]


def ground_truth_detections(images, *, with_difficult: bool) -> dict[str, ClassDetections]:
    rng = np.random.default_rng(0)
    detections = {}
    for label, name in enumerate(VOC_CLASSES):
        ids, boxes = [], []
        for image in images:
            mask = image.labels == label
            if not with_difficult:
                mask &= ~image.difficult
            ids += [image.image_id] * int(mask.sum())
            boxes.append(image.boxes[mask])
        detections[name] = ClassDetections(ids, rng.permutation(len(ids)) / max(len(ids), 1), np.concatenate(boxes))
    return detections


def test_voc_to_coco(images):
    coco = voc_to_coco(images)
    assert [c["name"] for c in coco["categories"]] == list(VOC_CLASSES)
    assert [c["id"] for c in coco["categories"]] == list(range(1, 21))
    image = next(i for i in images if i.difficult.any())
    anns = [a for a in coco["annotations"] if a["image_id"] == image.image_id]
    assert len(anns) == len(image.boxes)
    for ann, box, label, difficult in zip(anns, image.boxes, image.labels, image.difficult):
        x1, y1, x2, y2 = box.tolist()
        assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]  # xywh, no + 1
        assert ann["area"] == (x2 - x1) * (y2 - y1)
        assert ann["category_id"] == label + 1 and ann["iscrowd"] == int(difficult)
    assert min(a["id"] for a in coco["annotations"]) == 1
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])


def test_perfect_detections_score_one(images):
    result = evaluate_coco(ground_truth_detections(images, with_difficult=False), images)
    assert list(result.stats) == list(COCO_STAT_NAMES)
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert result.stats[key] == pytest.approx(1.0, abs=1e-12)
    present = {VOC_CLASSES[label] for image in images for label in image.labels[~image.difficult]}
    for name in VOC_CLASSES:
        if name in present:
            assert result.ap[name] == pytest.approx(1.0) and result.ap50[name] == pytest.approx(1.0)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in result.summary
    assert result.to_json()["map"] == result.stats["AP"]


def test_difficult_objects_are_ignore_regions(images):
    # detections exactly on difficult objects, ranked above everything: neither TP nor FP
    detections = ground_truth_detections(images, with_difficult=True)
    for name, dets in detections.items():
        label = VOC_CLASSES.index(name)
        hard = [(i.image_id, b) for i in images for b in i.boxes[(i.labels == label) & i.difficult]]
        if hard:
            detections[name] = ClassDetections.concatenate(
                [ClassDetections([h[0] for h in hard], np.full(len(hard), 2.0), np.array([h[1] for h in hard])), dets]
            )
    assert evaluate_coco(detections, images).stats["AP50"] == pytest.approx(1.0, abs=1e-12)


def test_jittered_detections_score_below_one_and_false_positives_hurt(images):
    perfect = ground_truth_detections(images, with_difficult=False)
    rng = np.random.default_rng(1)
    jittered = {
        n: ClassDetections(d.image_ids, d.scores, d.boxes + rng.normal(0, 4, d.boxes.shape)) for n, d in perfect.items()
    }
    stats = evaluate_coco(jittered, images).stats
    assert 0.2 < stats["AP"] < stats["AP50"] <= 1.0
    # a confident false positive in every image lowers AP50 below 1
    noisy = dict(perfect)
    corner = np.tile([[0.0, 0.0, 3.0, 3.0]], (len(images), 1))
    false_positives = ClassDetections([i.image_id for i in images], np.full(len(images), 5.0), corner)
    noisy["person"] = ClassDetections.concatenate([false_positives, perfect["person"]])
    assert evaluate_coco(noisy, images).ap50["person"] < 0.9


def test_no_detections_and_unknown_images(images):
    result = evaluate_coco({}, images)
    assert result.stats["AP"] == 0.0 and result.ap["car"] == 0.0
    with pytest.raises(DetectionsError, match="'nope'"):
        evaluate_coco({"car": ClassDetections(["nope"], [1.0], [[0, 0, 5, 5]])}, images)
