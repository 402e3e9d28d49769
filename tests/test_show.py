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
