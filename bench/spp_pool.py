"""Benchmark: pool 2,000 windows from a 512 x 43 x 57 map (SqueezeNet fire9 of a 500 x 375
image at s = 688) with the fast op against the loop reference written from the bin formula.

    python -m bench.spp_pool [--windows 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.ops import roi_pool

from bench.common import best_time, machine, print_table, write_json
from spp_detect.spp import PAPER_LEVELS, spatial_pyramid_pool
from tests.reference import spp_loop


def windows(num: int, height: int, width: int, max_side: int, gen: torch.Generator) -> torch.Tensor:
    """``num`` random inclusive cell ranges with sides 1..max_side inside the map."""
    w = torch.randint(1, min(max_side, width) + 1, (num,), generator=gen)
    h = torch.randint(1, min(max_side, height) + 1, (num,), generator=gen)
    x0 = (torch.rand(num, generator=gen) * (width - w + 1)).long()
    y0 = (torch.rand(num, generator=gen) * (height - h + 1)).long()
    return torch.stack([x0, y0, x0 + w - 1, y0 + h - 1], dim=1)


def roi_pool_every_level(fmap: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Ablation: one roi_pool per level, no reuse of the 6x6 level for 1, 2, 3."""
    rois = torch.cat([torch.zeros(len(cells), 1), cells.float()], dim=1)
    return torch.cat(
        [roi_pool(fmap[None], rois, (n, n), 1.0).flatten(1) for n in PAPER_LEVELS], dim=1
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--height", type=int, default=43)
    parser.add_argument("--width", type=int, default=57)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    fmap = torch.relu(torch.randn(args.channels, args.height, args.width, generator=gen))
    # Windows assigned to s=688 are about 224 px there, i.e. ~14 cells; also a mixed set.
    sets = {
        "typical (1-20 cells)": windows(args.windows, args.height, args.width, 20, gen),
        "mixed (1-57 cells)": windows(args.windows, args.height, args.width, 57, gen),
    }
    results: dict[str, object] = {"machine": machine(), "map": [args.channels, args.height, args.width],
                                  "windows": args.windows, "levels": list(PAPER_LEVELS), "sets": {}}
    rows = []
    for name, cells in sets.items():
        fast = best_time(lambda: spatial_pyramid_pool(fmap, cells), repeats=3)
        every = best_time(lambda: roi_pool_every_level(fmap, cells), repeats=3)
        loop = best_time(lambda: spp_loop(fmap, cells, PAPER_LEVELS), repeats=1)
        assert torch.equal(spatial_pyramid_pool(fmap, cells), spp_loop(fmap, cells, PAPER_LEVELS))
        results["sets"][name] = {
            "fast_s": fast, "roi_pool_every_level_s": every, "loop_reference_s": loop,
            "speedup_vs_loop": loop / fast, "speedup_vs_roi_pool_every_level": every / fast,
        }
        rows += [
            (f"{name}: fast op", f"{fast * 1e3:8.1f} ms  ({fast / args.windows * 1e6:.0f} us/window)"),
            (f"{name}: roi_pool per level", f"{every * 1e3:8.1f} ms  ({every / fast:.2f}x the fast op)"),
            (f"{name}: loop reference", f"{loop * 1e3:8.1f} ms  ({loop / fast:.0f}x the fast op)"),
        ]
    print_table(rows, f"SPP pooling of {args.windows} windows on a {args.channels}x{args.height}x{args.width} map")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
