"""proposal_recall on a hand-made case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from proposals.recall import proposal_recall
from spp_detect.datasets.voc import VOCImage


def _image(image_id, boxes, difficult):
    return VOCImage(
        image_id, Path("x.jpg"), 100, 100,
        np.asarray(boxes, np.float32), np.zeros(len(boxes), np.int64), np.asarray(difficult, bool),
    )


def test_hand_made_recall():
    images = [
        # two objects + one difficult (never counted)
        _image("a", [[0, 0, 10, 10], [50, 50, 70, 70], [0, 0, 99, 99]], [False, False, True]),
        _image("b", [[10, 10, 30, 30]], [False]),
        _image("c", [], []),  # no objects, no proposals
    ]
    proposals = {
        # box 0: IoU 0.5 exactly with GT a0 ([0,0,10,5]: 50 / 100); box 1 hits a1 exactly
        "a": np.array([[0, 0, 10, 5], [50, 50, 70, 70]], np.float32),
        # IoU with [10,10,30,30]: [10,10,30,26] -> 320 / 400 = 0.8
        "b": np.array([[10, 10, 30, 26]], np.float32),
        "c": np.zeros((0, 4), np.float32),
    }
    out = proposal_recall(images, proposals, top_k=(1, 2), thresholds=(0.5, 0.7))
    assert out["num_objects"] == 3
    assert out["recall"]["iou>=0.5"] == pytest.approx({"1": 2 / 3, "2": 1.0})
    assert out["recall"]["iou>=0.7"] == pytest.approx({"1": 1 / 3, "2": 2 / 3})
