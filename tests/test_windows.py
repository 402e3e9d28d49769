"""Hand-computed window -> cell mappings and scale choices."""

from __future__ import annotations

import pytest
import torch

from spp_detect.windows import PAPER_SCALES, choose_scales, scale_factors, windows_to_cells


def _cells(boxes, factor, stride, offset, map_hw):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    n = len(boxes)
    return windows_to_cells(
        boxes, torch.full((n,), float(factor)), stride, offset, torch.tensor([map_hw] * n)
    ).tolist()


def test_window_at_the_image_corner():
    # S=16, offset 0: cell j is centred at 0.5 + 16 j. x in [0, 50] holds centres 0.5..48.5
    # (cells 0-3); y in [0, 40] holds 0.5..32.5 (cells 0-2).
    assert _cells([[0, 0, 50, 40]], 1.0, 16, 0.0, (14, 14)) == [[0, 0, 3, 2]]


def test_window_spanning_the_image_takes_the_whole_map():
    # a 224 x 224 image on a floor(p/2)-padded stride-16 net gives a 14 x 14 map
    assert _cells([[0, 0, 224, 224]], 1.0, 16, 0.0, (14, 14)) == [[0, 0, 13, 13]]
    # a 500 x 375 image at scale 688 (factor 688/375): 917 x 688 pixels, a 43 x 58 map
    assert _cells([[0, 0, 500, 375]], 688 / 375, 16, 0.0, (43, 58)) == [[0, 0, 57, 42]]


def test_tiny_window_collapses_to_its_centre_cell():
    # x: [100, 110] -> left floor(99.5/16)+1 = 7 > right ceil(109.5/16)-1 = 6: collapsed;
    # centre 105 is nearest cell 7 (112.5) rather than 6 (96.5).
    # y: [100, 108] -> 7 > 6 collapsed; centre 104 is nearest cell 6 (96.5, 7.5 away).
    assert _cells([[100, 100, 110, 108]], 1.0, 16, 0.0, (14, 14)) == [[7, 6, 7, 6]]


def test_backbone_offset_and_resize_factor():
    # SqueezeNet geometry: offset 17, so cell j is centred at 17.5 + 16 j in the scaled image.
    # Window (10, 20, 60, 80) at factor 2 -> (20, 40, 120, 160): x cells with centres in
    # (20, 120) are 1..6, y cells with centres in (40, 160) are 2..8.
    assert _cells([[10, 20, 60, 80]], 2.0, 16, 17.0, (30, 30)) == [[1, 2, 6, 8]]


def test_cells_are_clamped_to_the_map():
    assert _cells([[0, 0, 224, 224]], 1.0, 16, 0.0, (5, 4)) == [[0, 0, 3, 4]]
    # a collapsed window past the right border takes the last cell
    assert _cells([[220, 0, 224, 224]], 1.0, 16, 0.0, (14, 13)) == [[12, 0, 12, 13]]


def test_empty_windows():
    out = windows_to_cells(torch.zeros((0, 4)), torch.zeros(0), 16, 0.0, torch.zeros((0, 2), dtype=torch.long))
    assert out.shape == (0, 4) and out.dtype == torch.int64
    assert choose_scales(torch.zeros((0, 4)), scale_factors(500, 375, PAPER_SCALES)).shape == (0,)


def test_scale_factors_bring_the_shorter_side_to_each_scale():
    factors = scale_factors(500, 375, PAPER_SCALES)
    assert factors.tolist() == pytest.approx([480 / 375, 576 / 375, 688 / 375, 864 / 375, 1200 / 375])


def test_each_of_the_five_scales_is_chosen_by_some_window():
    # For a 500 x 375 image, a square window of side 224 * 375 / s is exactly 224 x 224 at
    # scale s: sides 175, 145.83, 122.09, 97.22, 70 pick scales 0..4.
    factors = scale_factors(500, 375, PAPER_SCALES)
    sides = [224 * 375 / s for s in PAPER_SCALES]
    boxes = torch.tensor([[10, 10, 10 + a, 10 + a] for a in sides], dtype=torch.float32)
    assert choose_scales(boxes, factors).tolist() == [0, 1, 2, 3, 4]


def test_scale_choice_extremes_and_area_rule():
    factors = scale_factors(500, 375, PAPER_SCALES)
    boxes = torch.tensor(
        [
            [0, 0, 500, 375],  # the whole image: largest window -> smallest scale
            [0, 0, 10, 10],  # tiny -> largest scale
            # 100 x 140 = 14000 px: scaled areas 22938, 33030, 47124, 74318, 143360 at
            # the five scales; |. - 50176| is smallest at 688 (3052), index 2.
            [0, 0, 100, 140],
        ]
    )
    assert choose_scales(boxes, factors).tolist() == [0, 4, 2]
