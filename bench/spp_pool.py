"""Benchmark: pool 2,000 windows from a 512 x 43 x 57 map (SqueezeNet fire9 of a 500 x 375
image at s = 688) with the op (the CPU kernel), into a reused buffer from a channels-last
map (as ``detect`` calls it), through the roi_pool path (the op's non-CPU path, and the
CPU op before the kernel), against one roi_pool per level and the loop reference written
from the bin formula; and the time to merely fill the output with a constant (torch's
``fill_``), the floor that writing 2,000 x 25,600 floats puts under any pooling. All on
``--device`` (default cpu), but the loop reference, which runs on the CPU.

    python -m bench.spp_pool [--windows 2000] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.ops import roi_pool

from bench.common import add_device_option, best_time, machine, print_table, smoke_args, write_json
from spp_detect.device import resolve_device
from spp_detect.spp import PAPER_LEVELS, _pool_roi, spatial_pyramid_pool
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
    rois = torch.cat([torch.zeros(len(cells), 1, device=cells.device), cells.float()], dim=1)
    return torch.cat(
        [roi_pool(fmap[None], rois, (n, n), 1.0).flatten(1) for n in PAPER_LEVELS], dim=1
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--height", type=int, default=43)
    parser.add_argument("--width", type=int, default=57)
    add_device_option(parser)
    parser.add_argument("--json", type=Path, default=None)
    args = smoke_args(parser, windows=50, channels=16, height=10, width=12)

    device = resolve_device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    timed = lambda fn, repeats: best_time(lambda: (fn(), sync()), repeats=repeats)  # noqa: E731
    gen = torch.Generator().manual_seed(0)  # drawn on the CPU: the same map and windows on every device
    fmap_cpu = torch.relu(torch.randn(args.channels, args.height, args.width, generator=gen))
    fmap = fmap_cpu.to(device)
    # Windows assigned to s=688 are about 224 px there, i.e. ~14 cells; also a mixed set.
    sets = {
        "typical (1-20 cells)": windows(args.windows, args.height, args.width, 20, gen).to(device),
        "mixed (1-57 cells)": windows(args.windows, args.height, args.width, 57, gen).to(device),
    }
    results: dict[str, object] = {"machine": machine(), "device": str(device), "device_given": args.device,
                                  "map": [args.channels, args.height, args.width],
                                  "windows": args.windows, "levels": list(PAPER_LEVELS), "sets": {}}
    rows = []
    channels_last = fmap.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    buffer = torch.empty(args.windows, args.channels * 50, device=device)
    spatial_pyramid_pool(fmap, sets["typical (1-20 cells)"][:1])  # load the compiled kernel
    for name, cells in sets.items():
        fast = timed(lambda: spatial_pyramid_pool(fmap, cells), repeats=3)
        buffered = timed(lambda: spatial_pyramid_pool(channels_last, cells, out=buffer), repeats=5)
        fill = timed(lambda: buffer.fill_(1.0), repeats=5)
        roi = timed(lambda: _pool_roi(fmap, cells, PAPER_LEVELS), repeats=3)
        every = timed(lambda: roi_pool_every_level(fmap, cells), repeats=3)
        loop = best_time(lambda: spp_loop(fmap_cpu, cells.cpu(), PAPER_LEVELS), repeats=1)
        reference = spp_loop(fmap_cpu, cells.cpu(), PAPER_LEVELS)
        assert torch.equal(spatial_pyramid_pool(fmap, cells).cpu(), reference)
        assert torch.equal(_pool_roi(fmap, cells, PAPER_LEVELS).cpu(), reference)
        results["sets"][name] = {
            "fast_s": fast, "kernel_into_buffer_s": buffered, "output_fill_s": fill, "roi_pool_path_s": roi,
            "roi_pool_every_level_s": every, "loop_reference_s": loop,
            "speedup_vs_loop": loop / fast, "speedup_vs_roi_pool_path": roi / fast,
            "speedup_vs_roi_pool_every_level": every / fast,
        }
        rows += [
            (f"{name}: op (new output)", f"{fast * 1e3:8.1f} ms  ({fast / args.windows * 1e6:.0f} us/window)"),
            (f"{name}: op into a reused buffer", f"{buffered * 1e3:8.1f} ms  (fill_ of that buffer alone: {fill * 1e3:.1f} ms)"),
            (f"{name}: roi_pool path", f"{roi * 1e3:8.1f} ms  ({roi / fast:.1f}x the op)"),
            (f"{name}: roi_pool per level", f"{every * 1e3:8.1f} ms  ({every / fast:.1f}x the op)"),
            (f"{name}: loop reference", f"{loop * 1e3:8.1f} ms  ({loop / fast:.0f}x the op)"),
        ]
    print_table(rows, f"SPP pooling of {args.windows} windows on a {args.channels}x{args.height}x{args.width} map ({device})")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
