"""The box convention: conversions and box maths with known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spp_detect.boxes import box_area, box_iou, clip_boxes, from_voc_1based, remove_small_boxes, to_voc_1based


def test_voc_conversion_round_trip():
    voc = np.array([[1, 1, 500, 375], [48, 240, 195, 371]])
    ours = from_voc_1based(voc)
    assert ours.dtype == np.float32
    assert ours.tolist() == [[0, 0, 500, 375], [47, 239, 195, 371]]  # whole image = (0, 0, W, H)
    assert to_voc_1based(ours).tolist() == voc.tolist()
    t = from_voc_1based(torch.tensor(voc))
    assert isinstance(t, torch.Tensor) and t.tolist() == ours.tolist()


def test_iou_area_clip_known_values():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5]])
    assert box_iou(a, b)[0].tolist() == pytest.approx([50 / 150, 1.0, 0.0, 0.25])
    assert box_area(b).tolist() == [100, 100, 100, 25]
    assert clip_boxes(torch.tensor([[-3.0, 2, 40, 60]]), width=32, height=24).tolist() == [[0, 2, 32, 24]]
    assert box_iou(a, torch.zeros((0, 4))).shape == (1, 0)


def test_remove_small_boxes_keeps_order():
    boxes = torch.tensor([[0.0, 0, 30, 30], [0, 0, 19, 50], [0, 0, 50, 19.5], [5, 5, 25, 25]])
    assert remove_small_boxes(boxes, 20).tolist() == [0, 3]


def test_shape_errors():
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        box_area(torch.zeros(3, 5))
