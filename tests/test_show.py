"""Pictures for people: boxes drawn on a real image, and contact sheets of several."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from spp_detect.show import contact_sheet, draw_boxes

VOC_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2007-mini" / "VOC2007" / "JPEGImages"


def _real_images(n: int) -> list[np.ndarray]:
    paths = sorted(VOC_IMAGES.glob("*.jpg"))[:n]
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]


def test_draw_boxes_outlines_exactly_the_box_pixels():
    image = _real_images(1)[0]
    drawn = draw_boxes(image, np.array([[10.0, 20.0, 60.0, 90.0]]), ["dog 1.00"], [11])
    changed = np.any(drawn != image, axis=2)
    ys, xs = np.nonzero(changed)
    thickness = max(1, round(min(image.shape[:2]) / 250))
    # the outline covers pixels x 10 .. 59, y 20 .. 89 (cv2 centres thick lines on them)
    assert xs.min() == 10 - thickness // 2 and ys.max() == 89 + thickness // 2
    assert changed[89, 30] and changed[50, 10] and changed[50, 59]
    assert not changed[50, 35]  # the inside is untouched


def test_contact_sheet_places_resized_tiles_in_order():
    images = _real_images(5)
    sheet = contact_sheet(images, columns=3, tile_height=100, gap=4)
    widths = [round(im.shape[1] * 100 / im.shape[0]) for im in images]
    tile_width = max(widths)
    assert sheet.shape == (2 * 104 - 4, 3 * (tile_width + 4) - 4, 3)
    for index, image in enumerate(images):
        top, left = (index // 3) * 104, (index % 3) * (tile_width + 4)
        expected = cv2.resize(image, (widths[index], 100), interpolation=cv2.INTER_AREA)
        assert np.array_equal(sheet[top : top + 100, left : left + widths[index]], expected)
    assert np.all(sheet[100:104] == 255)  # the gap between rows is white


def test_contact_sheet_empty_and_bad_arguments():
    assert contact_sheet([]).shape == (0, 0, 3)
    with pytest.raises(ValueError, match="columns"):
        contact_sheet(_real_images(1), columns=0)


def test_match_detections_is_the_devkits_greedy_rule():
    from eval.voc import CORRECT, IGNORED, WRONG, match_detections

    gt = np.array([[10.0, 10.0, 60.0, 60.0], [100.0, 100.0, 150.0, 150.0]])
    boxes = np.array([[12.0, 12.0, 60.0, 60.0], [10.0, 10.0, 58.0, 61.0], [101.0, 99.0, 150.0, 150.0], [200.0, 0, 230, 30]])
    # the lower-scoring of the two on the first object is a duplicate; the third lies on a difficult object
    status = match_detections(np.array([0.5, 0.9, 0.1, 0.3]), boxes, gt, np.array([False, True]))
    assert status.tolist() == [WRONG, CORRECT, IGNORED, WRONG]
    assert match_detections(np.zeros(0), np.zeros((0, 4)), gt, np.array([False, False])).shape == (0,)


def test_show_draws_a_matching_box_green_and_a_wrong_one_red_and_counts_them(tmp_path):
    import json

    from click.testing import CliRunner

    import cli
    from spp_detect.show import CORRECT_COLOUR, WRONG_COLOUR

    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "cat.png"), np.full((375, 500, 3), 128, np.uint8))  # hand-made: grey
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 7, "file_name": "cat.png", "width": 500, "height": 375}],
                              "annotations": [{"id": 1, "image_id": 7, "category_id": 4, "bbox": [100, 100, 200, 150]}],
                              "categories": [{"id": 4, "name": "cat"}, {"id": 9, "name": "dog"}]}))
    dets = tmp_path / "dets.json"  # in the dataset's own ids
    dets.write_text(json.dumps([{"image_id": 7, "category_id": 4, "bbox": [105, 102, 195, 150], "score": 2.0},  # IoU 0.9
                                {"image_id": 7, "category_id": 4, "bbox": [350, 250, 100, 100], "score": 1.0}]))  # none
    out = tmp_path / "shown.png"
    result = CliRunner().invoke(cli.main, ["show", "--detections", str(dets), "--coco-json", str(gt), "--images",
                                           str(tmp_path / "images"), "--image", "cat", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "show: 2 detection(s) of cat above 0 -> " in result.output
    assert result.output.rstrip().endswith("show: 1 image, 2 detections drawn, 1 correct")
    rgb = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    assert tuple(rgb[200, 105]) == CORRECT_COLOUR  # the left edge of each box, below its caption
    assert tuple(rgb[320, 350]) == WRONG_COLOUR


def test_sheet_counts_what_show_would_draw_threshold_and_top_included():
    from types import SimpleNamespace

    from eval.results import ClassDetections
    from spp_detect.show import sheet_counts

    classes = ("cat", "dog")
    cat = SimpleNamespace(image_id="a", boxes=np.array([[100.0, 100, 300, 250]]), labels=np.array([0]),
                          difficult=np.array([False]))
    empty = SimpleNamespace(image_id="b", boxes=np.array([[0.0, 0, 50, 50]]), labels=np.array([1]),
                            difficult=np.array([False]))
    dets = {"cat": ClassDetections(np.array(["a", "a", "a", "b"]), np.array([2.0, 1.0, -0.5, -1.0]),
                                   np.array([[105.0, 102, 300, 252], [350, 250, 450, 350], [100, 100, 300, 250],
                                             [0, 0, 50, 50]])),
            "dog": ClassDetections(np.array(["a"]), np.array([0.5]), np.array([[100.0, 100, 300, 250]]))}
    # above 0 on "a": cat 2.0 (IoU 0.9: correct), dog 0.5 (no dog: wrong), cat 1.0 (no object: wrong);
    # the cat at -0.5 and everything on "b" score below 0
    assert sheet_counts(dets, [cat, empty], classes) == {"images": 2, "images_with_detections": 1, "drawn": 3,
                                                         "correct": 1}
    assert sheet_counts(dets, [cat, empty], classes, top=1) == {"images": 2, "images_with_detections": 1,
                                                                "drawn": 1, "correct": 1}
    assert sheet_counts(dets, [cat, empty], classes, threshold=-2.0, top=5)["drawn"] == 5


def test_pictures_of_small_images_are_enlarged_and_captions_stay_inside_and_apart():
    from spp_detect.show import _place_caption, picture

    image = _real_images(1)[0]
    small = cv2.resize(image, (400, 226), interpolation=cv2.INTER_AREA)
    boxes = np.array([[350.0, 10.0, 399.0, 60.0], [352.0, 12.0, 398.0, 58.0]])  # at the right edge, one on the other
    assert picture(small, boxes, ["vehicle 1.23", "animal 0.50"], [0, 1]).shape == (452, 800, 3)  # twice the size
    assert picture(image, boxes, ["a", "b"], [0, 1]).shape == image.shape  # VOC size: as it is
    placed: list = []
    for box in ((700, 20, 798, 120), (704, 24, 796, 116), (0, 0, 30, 30)):
        left, top = _place_caption(box, 120, 20, 800, 452, placed)
        assert 0 <= left and left + 120 <= 800 and 0 <= top and top + 20 <= 452
        assert not any(left < r and l < left + 120 and top < b and t < top + 20 for l, t, r, b in placed)
        placed.append((left, top, left + 120, top + 20))
