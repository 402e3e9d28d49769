"""eval.results: devkit result files and COCO results json, both ways, and their errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from eval.results import (
    ClassDetections,
    DetectionsError,
    detections_from_coco,
    detections_to_coco,
    from_devkit_frame,
    read_coco_results,
    read_detections,
    read_voc_results,
    to_devkit_frame,
    write_coco_results,
    write_voc_results,
)
from spp_detect.boxes import from_voc_1based, to_voc_1based
from spp_detect.datasets.voc import VOC_CLASSES


def sample(seed: int = 0, n: int = 50) -> dict[str, ClassDetections]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 300, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 200, (n, 2))], axis=1)
    ids = np.array([f"{i:06d}" for i in rng.integers(1, 10, n)])
    return {
        "car": ClassDetections(ids, rng.random(n), boxes),
        "dog": ClassDetections(ids[:3], [0.5, 0.5, 0.25], boxes[:3]),
    }


def test_devkit_frame_matches_boxes_module_and_round_trips():
    boxes = np.array([[0.0, 0.0, 10.0, 20.0], [4.5, 7.25, 9.0, 100.0]])
    assert to_devkit_frame(boxes).tolist() == [[1.0, 1.0, 10.0, 20.0], [5.5, 8.25, 9.0, 100.0]]
    np.testing.assert_array_equal(to_devkit_frame(boxes), to_voc_1based(boxes.astype(np.float32)))
    np.testing.assert_array_equal(from_devkit_frame(to_devkit_frame(boxes)), from_voc_1based(to_voc_1based(boxes)))
    assert to_devkit_frame(boxes).dtype == np.float64
    assert from_devkit_frame(to_devkit_frame(boxes)).tolist() == boxes.tolist()


def test_voc_results_round_trip_exact(tmp_path):
    detections = sample()
    paths = write_voc_results(detections, tmp_path, "test")
    assert [p.name for p in paths] == [f"comp4_det_test_{c}.txt" for c in VOC_CLASSES]
    first = (tmp_path / "comp4_det_test_dog.txt").read_text().splitlines()[0].split()
    box = detections["dog"].boxes[0]
    assert first[0] == detections["dog"].image_ids[0] and float(first[1]) == 0.5
    assert [float(v) for v in first[2:]] == [box[0] + 1, box[1] + 1, box[2], box[3]]  # 1-based devkit frame
    back = read_voc_results(tmp_path, "test")
    assert set(back) == set(VOC_CLASSES)  # empty files for the other classes
    for name, dets in detections.items():
        assert back[name].image_ids.tolist() == dets.image_ids.tolist()
        assert back[name].scores.tolist() == dets.scores.tolist()
        # exact in the devkit frame (what the devkit compares); 0-based within an ulp
        assert to_devkit_frame(back[name].boxes).tolist() == to_devkit_frame(dets.boxes).tolist()
        np.testing.assert_allclose(back[name].boxes, dets.boxes, rtol=1e-15, atol=0)
    assert len(back["cat"]) == 0


def test_missing_class_files_warn(tmp_path, caplog):
    write_voc_results(sample(), tmp_path, "test", comp_id="comp3")
    for name in ("cat", "sheep"):
        (tmp_path / f"comp3_det_test_{name}.txt").unlink()
    with caplog.at_level(logging.WARNING):
        back = read_voc_results(tmp_path, "test")
    assert "cat" not in back and "sheep" not in back and len(back) == 18
    assert "cat, sheep" in caplog.text


def test_devkit_file_errors(tmp_path):
    with pytest.raises(DetectionsError, match="no devkit result files"):
        read_voc_results(tmp_path, "test")
    path = tmp_path / "comp4_det_test_car.txt"
    path.write_text("000001 0.9 1 1 10 10\n\n000002 0.8 1 1 10\n")
    with pytest.raises(DetectionsError, match=r"comp4_det_test_car.txt:3: expected"):
        read_voc_results(tmp_path, "test")
    path.write_text("000001 high 1 1 10 10\n")
    with pytest.raises(DetectionsError, match=r"car.txt:1:"):
        read_voc_results(tmp_path, "test")
    path.write_text("000001 nan 1 1 10 10\n")
    with pytest.raises(DetectionsError, match=r"car.txt:1: NaN"):
        read_voc_results(tmp_path, "test")
    path.write_text("000001 0.5 1 1 10 10\n")
    (tmp_path / "comp3_det_test_car.txt").write_text("")
    with pytest.raises(DetectionsError, match="several result files"):
        read_voc_results(tmp_path, "test")
    assert len(read_voc_results(tmp_path, "test", comp_id="comp4")["car"]) == 1
    with pytest.raises(DetectionsError, match="unknown classes"):
        write_voc_results({"kar": ClassDetections.empty()}, tmp_path, "test")


def test_coco_results_round_trip(tmp_path):
    detections = sample(1)
    results = detections_to_coco(detections)
    box = detections["car"].boxes[0]
    assert results[0]["category_id"] == VOC_CLASSES.index("car") + 1
    assert results[0]["bbox"] == pytest.approx([box[0], box[1], box[2] - box[0], box[3] - box[1]])
    path = write_coco_results(detections, tmp_path / "dets.json")
    back = read_detections(path, "test")
    assert set(back) == {"car", "dog"}
    for name, dets in detections.items():
        assert back[name].image_ids.tolist() == dets.image_ids.tolist()
        assert back[name].scores.tolist() == dets.scores.tolist()
        np.testing.assert_allclose(back[name].boxes, dets.boxes, rtol=0, atol=1e-9)


def test_coco_integer_image_ids_and_errors(tmp_path):
    dets = detections_from_coco([{"image_id": 17, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}])
    assert dets["aeroplane"].image_ids.tolist() == ["17"] and dets["aeroplane"].boxes.tolist() == [[1, 2, 4, 6]]
    bad = [
        ({"image_id": "1", "category_id": 21, "bbox": [0, 0, 1, 1], "score": 1}, "outside 1..20"),
        ({"image_id": "1", "category_id": 1, "bbox": [0, 0, 1], "score": 1}, "bbox"),
        ({"image_id": "1", "category_id": 1, "bbox": [0, 0, 1, 1]}, "missing key 'score'"),
        ({"image_id": 1.5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}, "image_id"),
    ]
    for entry, message in bad:
        with pytest.raises(DetectionsError, match=message):
            detections_from_coco([entry])
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(DetectionsError, match="bad.json: not a COCO results json"):
        read_coco_results(path)
    path.write_text(json.dumps({"image_id": "1"}))
    with pytest.raises(DetectionsError, match="expected a json list"):
        read_coco_results(path)


def test_class_detections_validation():
    with pytest.raises(DetectionsError, match="same length"):
        ClassDetections(["a"], [0.1, 0.2], np.zeros((2, 4)))
    with pytest.raises(DetectionsError, match="NaN"):
        ClassDetections(["a"], [np.nan], np.zeros((1, 4)))
    both = ClassDetections.concatenate([sample()["dog"], ClassDetections.empty(), sample()["dog"]])
    assert len(both) == 6 and both.boxes.shape == (6, 4) and len(ClassDetections.concatenate([])) == 0
