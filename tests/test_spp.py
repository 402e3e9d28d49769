"""spatial_pyramid_pool against the loop reference, value for value."""

from __future__ import annotations

import math

import pytest
import torch

from torchvision.ops import roi_pool

from spp_detect.spp import PAPER_LEVELS, SpatialPyramidPool, _pool_roi, exact_level, spatial_pyramid_pool
from tests.reference import spp_loop


def _random_cells(num: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    x0 = torch.randint(0, width, (num,), generator=gen)
    y0 = torch.randint(0, height, (num,), generator=gen)
    x1 = x0 + (torch.rand(num, generator=gen) * (width - x0)).long()
    y1 = y0 + (torch.rand(num, generator=gen) * (height - y0)).long()
    return torch.stack([x0, y0, x1, y1], dim=1)


@pytest.mark.parametrize("seed,channels,height,width", [(0, 8, 13, 13), (1, 5, 7, 19), (2, 3, 43, 57), (3, 4, 1, 9)])
@pytest.mark.parametrize("levels", [PAPER_LEVELS, (6, 3, 2, 1), (4, 2), (5,), (1, 2, 3, 4, 6)])
def test_matches_loop_reference_on_random_windows(seed, channels, height, width, levels):
    gen = torch.Generator().manual_seed(seed)
    fmap = torch.randn(channels, height, width, generator=gen)  # negatives too: a real max, not 0-floor
    special = torch.tensor(
        [
            [0, 0, width - 1, height - 1],  # the whole map
            [0, 0, 0, 0],  # 1x1 at the corner
            [width - 1, height - 1, width - 1, height - 1],  # 1x1 at the opposite corner
            [width - 1, 0, width - 1, height - 1],  # a column on the right border
            [0, height - 1, width - 1, height - 1],  # a row on the bottom border
        ]
    )
    cells = torch.cat([special, _random_cells(60, height, width, gen)])
    fast = spatial_pyramid_pool(fmap, cells, levels)
    slow = spp_loop(fmap, cells, levels)
    assert fast.shape == (len(cells), channels * sum(n * n for n in levels))
    assert torch.equal(fast, slow)


def test_hand_computed_bins_on_a_5_cell_window():
    # One channel, a 1 x 5 map holding 0..4; window = all 5 cells; level 3 bins are
    # [0,2), [1,4), [3,5) -> maxima 1, 3, 4; level 2 bins [0,3), [2,5) -> 2, 4; rows likewise.
    fmap = torch.arange(5.0).view(1, 1, 5).expand(1, 5, 5).clone()  # value = x
    out = spatial_pyramid_pool(fmap, torch.tensor([[0, 0, 4, 4]]), (1, 2, 3))
    level1, level2, level3 = out[0, :1], out[0, 1:5].view(2, 2), out[0, 5:].view(3, 3)
    assert level1.tolist() == [4.0]
    assert level2.tolist() == [[2.0, 4.0], [2.0, 4.0]]
    assert level3.tolist() == [[1.0, 3.0, 4.0]] * 3


def test_layout_is_level_then_channel_then_y_then_x():
    fmap = torch.zeros(2, 2, 2)
    fmap[1, 0, 1] = 7.0  # channel 1, y 0, x 1
    out = spatial_pyramid_pool(fmap, torch.tensor([[0, 0, 1, 1]]), (1, 2))
    # level 1: [c0, c1] ; level 2: c0 (4 values) then c1 with (y0,x1) at index 1
    assert out[0].tolist() == [0.0, 7.0, 0, 0, 0, 0, 0.0, 7.0, 0.0, 0.0]


def test_empty_windows_give_empty_output():
    out = spatial_pyramid_pool(torch.randn(16, 5, 6), torch.zeros((0, 4), dtype=torch.int64))
    assert out.shape == (0, 16 * 50)


def test_rejects_cells_outside_the_map():
    with pytest.raises(ValueError, match="inside a 5 x 6 map"):
        spatial_pyramid_pool(torch.randn(2, 5, 6), torch.tensor([[0, 0, 6, 2]]))
    with pytest.raises(ValueError, match="inclusive range"):
        spatial_pyramid_pool(torch.randn(2, 5, 6), torch.tensor([[3, 0, 2, 2]]))


def test_exact_levels_are_the_documented_ones():
    assert [n for n in range(1, 17) if exact_level(n)] == [1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 16]
    # level 7 really is wrong through roi_pool at 7 x 7 for a 57-cell window: its last bin
    # ends at cell 58 (float32) instead of 57, taking in a cell outside the window, which
    # is why _pool_roi pools that level bin by bin
    fmap = torch.arange(60.0).view(1, 1, 60)
    naive = roi_pool(fmap[None], torch.tensor([[0.0, 0, 0, 56, 0]]), (7, 7), 1.0)[0, 0, 0]
    assert not torch.equal(naive, spp_loop(fmap, torch.tensor([[0, 0, 56, 0]]), (7,))[0].view(7, 7)[0])


@pytest.mark.parametrize("implementation", ["cpu-kernel", "roi_pool"])
@pytest.mark.parametrize("level", range(1, 17))
def test_every_level_1_to_16_is_exact(implementation, level):
    gen = torch.Generator().manual_seed(level)
    height, width = 9, 61  # widths up to 61 reach the first float32 failures (7, 29, 57)
    fmap = torch.randn(3, height, width, generator=gen)
    cells = torch.cat([torch.tensor([[0, 0, width - 1, height - 1], [0, 0, 56, 6], [3, 1, 31, 8], [2, 2, 2, 2]]),
                       _random_cells(40, height, width, gen)])
    levels = (1, level) if level % 2 else (level, level // 2, 1)  # also coarse levels derived from finer
    pool = spatial_pyramid_pool if implementation == "cpu-kernel" else _pool_roi
    assert torch.equal(pool(fmap, cells, levels), spp_loop(fmap, cells, levels))


def test_writes_into_a_given_buffer_and_reads_channels_last_maps():
    gen = torch.Generator().manual_seed(5)
    fmap = torch.randn(6, 11, 13, generator=gen)
    cells = _random_cells(30, 11, 13, gen)
    expected = spp_loop(fmap, cells, PAPER_LEVELS)
    channels_last = fmap.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    buffer = torch.full((30, 6 * 50), float("nan"))
    out = spatial_pyramid_pool(channels_last, cells, PAPER_LEVELS, out=buffer)
    assert out.data_ptr() == buffer.data_ptr() and torch.equal(buffer, expected)
    assert torch.equal(spatial_pyramid_pool(fmap.double(), cells), expected.double())
    with pytest.raises(ValueError, match="out must be"):
        spatial_pyramid_pool(fmap, cells, PAPER_LEVELS, out=torch.empty(29, 6 * 50))


def test_bfloat16_output_is_rounded_as_torch_rounds():
    gen = torch.Generator().manual_seed(6)
    fmap = torch.randn(5, 9, 10, generator=gen)
    # exact ties between two bfloat16 values (low 16 bits 0x8000), with even and odd upper halves
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x40018000], dtype=torch.int64).to(torch.int32)
    fmap.view(-1)[:4] = ties.view(torch.float32)
    cells = torch.cat([torch.tensor([[0, 0, 0, 0], [1, 0, 1, 0], [2, 0, 2, 0], [3, 0, 3, 0]]),
                       _random_cells(30, 9, 10, gen)])
    out = spatial_pyramid_pool(fmap, cells, PAPER_LEVELS, out=torch.empty(len(cells), 5 * 50, dtype=torch.bfloat16))
    expected = spp_loop(fmap, cells, PAPER_LEVELS).to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_module_wraps_the_function():
    module = SpatialPyramidPool((1, 2))
    fmap, cells = torch.randn(3, 4, 4), torch.tensor([[0, 1, 3, 3]])
    assert module.bins == 5
    assert repr(module) == "SpatialPyramidPool(levels=(1, 2))"
    assert torch.equal(module(fmap, cells), spatial_pyramid_pool(fmap, cells, (1, 2)))


def test_gradient_flows_to_the_max_cells():
    fmap = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    out = spatial_pyramid_pool(fmap, torch.tensor([[1, 1, 4, 5]]), (1, 2, 3))
    out.sum().backward()
    assert fmap.grad is not None and math.isclose(float(fmap.grad.sum()), out.numel())
