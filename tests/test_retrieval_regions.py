"""R-MAC regions: docs/sources.md 5.1's worked vectors, written out from the rule by hand."""

from __future__ import annotations

import numpy as np
import pytest

from spp_detect.retrieval.regions import cells_to_pixels, rmac_regions


def grid(side: int, rows: list[int], cols: list[int]) -> list[list[int]]:
    return [[x, y, x + side, y + side] for y in rows for x in cols]


def test_30x40_worked_vectors():
    # H x W = 30 x 40: w = 30; b = 10/(steps-1); |0.6 - b/30| is least for steps = 2, so the
    # long side gets l + 1 regions. L1: side 30, b = 10 -> cols 0, 10. L2: side 20, wl2 = 9,
    # b = 20/2 -> cols 0, 10, 20, rows b = 10/1 -> 0, 10. L3: side 15, wl2 = 6, b = 25/3 ->
    # floor(6 + 8.33k) - 6 = 0, 8, 16, 25; rows b = 15/2 -> 0, 7, 15.
    expected = grid(30, [0], [0, 10]) + grid(20, [0, 10], [0, 10, 20]) + grid(15, [0, 7, 15], [0, 8, 16, 25])
    assert rmac_regions(30, 40).tolist() == expected


def test_transposed_map_transposes_regions():
    regions = rmac_regions(40, 30)
    assert sorted(regions[:, [1, 0, 3, 2]].tolist()) == sorted(rmac_regions(30, 40).tolist())


@pytest.mark.parametrize(("height", "width", "count"), [(32, 32, 14), (24, 32, 20), (30, 40, 20)])
def test_counts(height, width, count):
    regions = rmac_regions(height, width)
    assert len(regions) == count
    assert (regions[:, :2] >= 0).all() and (regions[:, 2] <= width).all() and (regions[:, 3] <= height).all()


def test_square_map_levels():
    # 32 x 32: L1 the whole map; L2 side floor(64/3) = 21, offsets 0 and 11; L3 side 16, 0/8/16.
    regions = rmac_regions(32, 32)
    assert regions[0].tolist() == [0, 0, 32, 32]
    assert regions[1:5].tolist() == grid(21, [0, 11], [0, 11])
    assert regions[5:].tolist() == grid(16, [0, 8, 16], [0, 8, 16])


def test_tiny_maps():
    assert rmac_regions(1, 1).tolist() == [[0, 0, 1, 1]]  # levels 2 and 3 have side 0
    with pytest.raises(ValueError, match="at least 1 x 1"):
        rmac_regions(0, 5)


def test_cells_to_pixels():
    boxes = cells_to_pixels(np.array([[2, 0, 5, 3]]), stride=16, offset=0.0, width=200, height=100)
    assert boxes.tolist() == [[24.0, 0.0, 72.0, 40.0]]  # clipped at the top edge
