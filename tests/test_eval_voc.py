"""eval.voc: hand-computed AP cases, and equality with slow ports of the devkit on real VOC."""

from __future__ import annotations

import numpy as np
import pytest

from eval.results import ClassDetections, DetectionsError, to_devkit_frame, write_voc_results, read_voc_results
from eval.voc import devkit_iou, evaluate_voc, voc07_recall_thresholds, voc_ap, voc_eval
from spp_detect.datasets.voc import VOC_CLASSES, read_voc, voc_year_dir
from tests.reference_voc import devkit_voc_eval, matlab_colon, py_faster_rcnn_voc_eval

RULES = ("devkit", "py-faster-rcnn")


def run(dets, gt, **kwargs):
    """``dets``: [(image_id, score, 0-based box)]; ``gt``: {image_id: [(0-based box, difficult)]}."""
    ids = list(gt)
    return voc_eval(
        [d[0] for d in dets],
        np.array([d[1] for d in dets], dtype=float),
        np.array([d[2] for d in dets], dtype=float).reshape(-1, 4),
        ids,
        [np.array([g[0] for g in gt[i]], dtype=float).reshape(-1, 4) for i in ids],
        [np.array([g[1] for g in gt[i]], dtype=bool) for i in ids],
        **kwargs,
    )


A = [10.0, 10.0, 50.0, 50.0]
B = [100.0, 100.0, 160.0, 180.0]
C = [200.0, 20.0, 260.0, 90.0]
FAR = [300.0, 300.0, 320.0, 320.0]


# ---------------------------------------------------------------------------- voc_ap
def test_recall_thresholds_matlab_colon_vs_numpy():
    devkit = voc07_recall_thresholds("devkit")
    assert devkit.tolist() == matlab_colon(0.0, 0.1, 1.0)
    assert devkit[6] == 0.6 and devkit[7] == 0.7 and devkit[3] == 0.30000000000000004
    numpy_ = voc07_recall_thresholds("py-faster-rcnn")
    assert numpy_[6] == 0.6000000000000001 and numpy_[7] == 0.7000000000000001
    assert np.flatnonzero(devkit != numpy_).tolist() == [6, 7]


@pytest.mark.parametrize("rule", RULES)
def test_voc_ap_hand_curve(rule):
    # ranks: TP, duplicate FP, TP with 2 objects: rec .5 .5 1, prec 1 .5 2/3
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    # 11-point: t = 0 .. 0.5 (6 thresholds) see precision 1, t = 0.6 .. 1 (5) see 2/3
    assert voc_ap(rec, prec, True, rule) == pytest.approx(6 / 11 + 5 / 11 * 2 / 3, abs=1e-12)
    # area: envelope 1 on (0, .5], 2/3 on (.5, 1]
    assert voc_ap(rec, prec, False, rule) == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)


def test_voc_ap_recall_exactly_at_a_threshold():
    # 6 of 10 objects found at precision 1: the devkit's t = 0.6 sees it, numpy's 0.6000000000000001 not
    rec, prec = np.array([6 / 10]), np.array([1.0])
    assert voc_ap(rec, prec, True, "devkit") == pytest.approx(7 / 11, abs=1e-12)
    assert voc_ap(rec, prec, True, "py-faster-rcnn") == pytest.approx(6 / 11, abs=1e-12)
    # 3 of 10: both use 0.30000000000000004 > 0.3
    for rule in RULES:
        assert voc_ap(np.array([3 / 10]), prec, True, rule) == pytest.approx(3 / 11, abs=1e-12)
    assert voc_ap(rec, prec, False) == pytest.approx(0.6, abs=1e-12)


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_voc_ap_empty_curve_is_zero(use_07_metric):
    assert voc_ap(np.zeros(0), np.zeros(0), use_07_metric) == 0.0


def test_voc_ap_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        voc_ap(np.zeros(2), np.zeros(3), True)


# ---------------------------------------------------------------------------- voc_eval by hand
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("use_07_metric", [True, False])
def test_perfect_detector(rule, use_07_metric):
    gt = {"a": [(A, False), (B, False)], "b": [(C, False)]}
    dets = [("a", 0.9, A), ("b", 0.8, C), ("a", 0.7, B)]
    result = run(dets, gt, rule=rule, use_07_metric=use_07_metric)
    assert result.tp.tolist() == [True, True, True] and not result.fp.any()
    assert result.rec.tolist() == [1 / 3, 2 / 3, 1.0]
    assert result.npos == 3
    assert result.ap == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("rule", RULES)
def test_detection_on_difficult_object_is_ignored(rule):
    gt = {"a": [(A, False), (B, True)]}
    dets = [("a", 0.9, B), ("a", 0.8, A)]  # the top detection hits the difficult object
    result = run(dets, gt, rule=rule)
    assert result.npos == 1  # recall over non-difficult objects only
    assert result.tp.tolist() == [False, True] and result.fp.tolist() == [False, False]
    assert result.prec.tolist() == [0.0, 1.0] and result.rec.tolist() == [0.0, 1.0]
    assert result.ap == pytest.approx(1.0, abs=1e-12)  # as a false positive it would be 0.5 at recall 1


@pytest.mark.parametrize("rule", RULES)
def test_duplicate_detection_is_a_false_positive(rule):
    gt = {"a": [(A, False), (B, False)]}
    dup = [11.0, 10.0, 51.0, 50.0]
    dets = [("a", 0.9, A), ("a", 0.8, dup), ("a", 0.7, B)]
    result = run(dets, gt, rule=rule)
    assert result.tp.tolist() == [True, False, True] and result.fp.tolist() == [False, True, False]
    np.testing.assert_allclose(result.prec, [1.0, 0.5, 2 / 3])
    assert result.ap == pytest.approx(28 / 33, abs=1e-12)
    assert run(dets, gt, rule=rule, use_07_metric=False).ap == pytest.approx(5 / 6, abs=1e-12)


def test_match_goes_to_max_iou_box_even_if_taken():
    # devkit: the second detection's best box is A (already taken) -> FP, although B is free
    gt = {"a": [(A, False), ([10.0, 10.0, 50.0, 60.0], False)]}
    dets = [("a", 0.9, A), ("a", 0.8, [10.0, 10.0, 50.0, 52.0])]
    result = run(dets, gt)
    assert result.tp.tolist() == [True, False]


@pytest.mark.parametrize("rule", RULES)
def test_no_detections_ap_zero(rule):
    gt = {"a": [(A, False)], "b": []}
    for use_07_metric in (True, False):
        result = run([], gt, rule=rule, use_07_metric=use_07_metric)
        assert result.ap == 0.0 and result.rec.shape == (0,) and result.prec.shape == (0,)


def test_detections_without_any_ground_truth_are_false_positives():
    result = run([("b", 0.5, A)], {"a": [(A, False)], "b": []})
    assert result.fp.tolist() == [True] and result.ap == 0.0


def test_no_positive_object_gives_nan_ap():
    result = run([("a", 0.5, A)], {"a": [(A, True)]})
    assert result.npos == 0 and np.isnan(result.ap)


def test_iou_exactly_at_threshold_under_both_rules():
    gt_box = [0.0, 0.0, 10.0, 10.0]  # devkit frame 1..10: 10 x 10 pixels
    half = [0.0, 0.0, 10.0, 5.0]  # devkit frame 1..10 x 1..5: 50 pixels inside, union 100
    iou = devkit_iou(to_devkit_frame(np.array([half])), to_devkit_frame(np.array([gt_box]))[None])
    assert iou.tolist() == [[0.5]]
    gt = {"a": [(gt_box, False)]}
    devkit = run([("a", 0.9, half)], gt, rule="devkit")  # ovmax >= 0.5
    pyfrcnn = run([("a", 0.9, half)], gt, rule="py-faster-rcnn")  # ovmax > 0.5
    assert devkit.tp.tolist() == [True] and devkit.ap == pytest.approx(1.0, abs=1e-12)
    assert pyfrcnn.fp.tolist() == [True] and pyfrcnn.ap == 0.0


def test_devkit_iou_plus_one_rule_and_no_overlap():
    # 1-based inclusive frame: [1, 1, 2, 2] is 2 x 2 pixels; [3, 3, 4, 4] touches nothing
    boxes = np.array([[1.0, 1.0, 2.0, 2.0]])
    gt = np.array([[[1.0, 1.0, 2.0, 2.0], [2.0, 2.0, 3.0, 3.0], [3.0, 3.0, 4.0, 4.0]]])
    iou = devkit_iou(boxes, gt)
    assert iou[0, 0] == 1.0 and iou[0, 1] == pytest.approx(1 / 7) and iou[0, 2] == -np.inf


def test_score_ties_keep_input_order_like_matlab():
    gt = {"a": [(A, False)]}
    miss_first = [("a", 0.5, FAR), ("a", 0.5, A)]
    hit_first = [("a", 0.5, A), ("a", 0.5, FAR)]
    first = run(miss_first, gt)
    assert first.order.tolist() == [0, 1] and first.tp.tolist() == [False, True]
    assert first.ap == pytest.approx(6 / 11 * 0.5 + 5 / 11 * 0.5, abs=1e-12)  # precision 0.5 at recall 1
    second = run(hit_first, gt)
    assert second.tp.tolist() == [True, False] and second.ap == pytest.approx(1.0, abs=1e-12)


def test_scores_sorted_descending_with_infinite_scores():
    gt = {"a": [(A, False)]}
    result = run([("a", 0.1, FAR), ("a", np.inf, A), ("a", -np.inf, FAR)], gt)
    assert result.order.tolist() == [1, 0, 2] and result.ap == pytest.approx(1.0, abs=1e-12)


def test_unknown_image_id_is_an_error():
    with pytest.raises(DetectionsError, match="'zzz'"):
        run([("zzz", 0.5, A)], {"a": [(A, False)]})


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown rule"):
        run([], {"a": []}, rule="matlab")
    with pytest.raises(ValueError, match="iou_threshold"):
        run([], {"a": []}, iou_threshold=0.0)
    with pytest.raises(DetectionsError, match="shape"):
        voc_eval(["a"], [0.5], [[1.0, 2.0]], ["a"], [np.zeros((0, 4))], [np.zeros(0, bool)])


def test_large_blocks_match_single_block(monkeypatch):
    rng = np.random.default_rng(0)
    gt = {str(i): [(list(rng.uniform(0, 50, 2)) + list(rng.uniform(60, 120, 2)), bool(rng.random() < 0.2))
                   for _ in range(rng.integers(0, 6))] for i in range(30)}
    dets = [(str(rng.integers(30)), float(rng.random()), list(rng.uniform(0, 50, 2)) + list(rng.uniform(60, 120, 2)))
            for _ in range(500)]
    whole = run(dets, gt)
    monkeypatch.setattr("eval.voc._IOU_BLOCK", 7)
    blocked = run(dets, gt)
    assert blocked.tp.tolist() == whole.tp.tolist() and blocked.ap == whole.ap


# ---------------------------------------------------------------------------- real VOC vs references
def jittered_detections(images, seed: int, *, unique_scores: bool) -> dict[str, ClassDetections]:
    """Jittered ground truth (3 copies per object, some at IoU exactly 0.5), confusions with
    other classes and random false positives; boxes clipped to the image (0-based xyxy)."""
    rng = np.random.default_rng(seed)
    detections = {}
    for label, name in enumerate(VOC_CLASSES):
        ids, boxes = [], []
        for image in images:
            size = np.array([image.width, image.height] * 2, dtype=float)
            own = image.boxes[image.labels == label].astype(float)
            other = image.boxes[image.labels != label].astype(float)
            for box in own:
                wh = np.tile(box[2:] - box[:2], 2)
                for sigma in (0.03, 0.12, 0.3):
                    boxes.append(np.clip(box + rng.normal(0, sigma, 4) * wh, 0, size))
                    ids.append(image.image_id)
                width = box[2] - box[0]  # devkit frame width, integer
                if width % 2 == 0:  # left half: IoU exactly 0.5 under the + 1 rule
                    boxes.append(np.array([box[0], box[1], box[0] + width / 2, box[3]]))
                    ids.append(image.image_id)
            for box in other[: 1 + int(rng.integers(2))]:
                boxes.append(box)
                ids.append(image.image_id)
        for _ in range(120):
            image = images[int(rng.integers(len(images)))]
            x1, x2 = np.sort(rng.uniform(0, image.width, 2))
            y1, y2 = np.sort(rng.uniform(0, image.height, 2))
            boxes.append(np.array([x1, y1, x2, y2]))
            ids.append(image.image_id)
        scores = rng.random(len(ids))
        if not unique_scores:
            scores = np.round(scores, 2)  # many ties, as in 3-decimal result files
        detections[name] = ClassDetections(np.array(ids), scores, np.array(boxes))
    return detections


@pytest.fixture(scope="module")
def test_images(voc_root):
    return read_voc(voc_root, "test")


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_real_voc_equals_devkit_port(voc_root, test_images, tmp_path, use_07_metric):
    detections = jittered_detections(test_images, seed=7, unique_scores=False)
    write_voc_results(detections, tmp_path, "test")
    in_memory = evaluate_voc(detections, test_images, use_07_metric=use_07_metric)
    from_files = evaluate_voc(read_voc_results(tmp_path, "test"), test_images, use_07_metric=use_07_metric)
    annotations = voc_year_dir(voc_root) / "Annotations"
    image_ids = [image.image_id for image in test_images]
    num_ties = 0
    for name in VOC_CLASSES:
        rec, prec, ap = devkit_voc_eval(tmp_path / f"comp4_det_test_{name}.txt", annotations, image_ids, name,
                                        use_07_metric=use_07_metric)
        for result in (in_memory.per_class[name], from_files.per_class[name]):
            assert abs(result.ap - ap) <= 1e-9, name
            np.testing.assert_array_equal(result.rec, rec)
            np.testing.assert_array_equal(result.prec, np.nan_to_num(prec, nan=0.0))
        num_ties += len(detections[name]) - len(np.unique(detections[name].scores))
        assert in_memory.per_class[name].tp.any() and in_memory.per_class[name].fp.any()
    assert num_ties > 1000  # ties were exercised
    assert 0.1 < in_memory.map < 0.95


def test_real_voc_py_faster_rcnn_rule_equals_its_port(voc_root, test_images, tmp_path):
    detections = jittered_detections(test_images, seed=11, unique_scores=True)
    write_voc_results(detections, tmp_path, "test")
    ours = evaluate_voc(detections, test_images, rule="py-faster-rcnn")
    devkit = evaluate_voc(detections, test_images, rule="devkit")
    annotations = voc_year_dir(voc_root) / "Annotations"
    image_ids = [image.image_id for image in test_images]
    for name in VOC_CLASSES:
        rec, prec, ap = py_faster_rcnn_voc_eval(tmp_path / f"comp4_det_test_{name}.txt", annotations, image_ids, name)
        assert abs(ours.per_class[name].ap - ap) <= 1e-9, name
        np.testing.assert_array_equal(ours.per_class[name].rec, rec)
    # the IoU == 0.5 detections can be true positives for the devkit only (same ranks: unique scores)
    changed = [n for n in VOC_CLASSES if not np.array_equal(devkit.per_class[n].tp, ours.per_class[n].tp)]
    assert len(changed) >= 5


def test_evaluate_voc_missing_class_and_json(test_images):
    image = test_images[0]
    label = int(image.labels[0])
    name = VOC_CLASSES[label]
    boxes = image.boxes[image.labels == label]
    detections = {name: ClassDetections([image.image_id] * len(boxes), np.linspace(1, 0.5, len(boxes)), boxes)}
    result = evaluate_voc(detections, test_images)
    assert set(result.ap) == set(VOC_CLASSES)
    other = [c for c in VOC_CLASSES if c != name]
    assert all(result.ap[c] == 0.0 for c in other)  # no detections: AP 0, no crash
    assert result.ap[name] > 0
    summary = result.to_json()
    assert summary["map"] == pytest.approx(np.mean(list(result.ap.values())))
    assert summary["num_detections"][name] == len(boxes) and summary["metric"] == "11point"
    with pytest.raises(DetectionsError, match="unknown classes"):
        evaluate_voc({"person ": detections[name]}, test_images)
