"""Benchmark: fc-only fine-tuning speed from a 1-scale and from a 5-scale cache of the same
images (issue 30 item 3: at 5 scales, seconds per 100 iterations within 1.5x of 1 scale's).

Fine-tuning (``finetune``, ``train_from=fc6``) draws each round's windows from every
training image, a random scale per window; it pools a *pass* of rounds at once, as many as
their fp16 rows fit in :func:`spp_detect.finetune.pass_budget`, decoding each image drawn
in the pass once, at the scales its rows use. Per-round pooling decoded every image's every
scale each round: at 5 scales, ~3 minutes of each 100 iterations.

What it runs: the first ``--images`` images of ``voc2007-trainval-plus`` trainval and their
mirrors (``extract --flip``, as :data:`bench.detection.RECIPE` trains), cached at 688
(``1-scale``) and at the paper's 5 scales (``5-scale``) through
:class:`bench.detection.Bench` under ``--work`` (reused when there), then ``finetune`` on
each for ``--iterations`` iterations with :class:`~spp_detect.finetune.FinetuneSettings`'
defaults (100 minibatches of 128 per round) except ``fc_dim`` 1,024, into a folder made
afresh (``force``). The time is ``run_finetune``'s own (the training loop: passes and SGD;
not the set-up that reads the windows and the input scale). The machine is shared, so each
column runs ``--repeats`` times, the columns alternated, and the fastest run of each counts.

JSON: ``seconds_per_100_iterations`` and ``sgd_seconds_per_100_iterations`` (the same
without the passes) per column (its fastest run; ``all_seconds_per_100_iterations``: every
run), ``ratio_5_to_1``, and of the fastest runs: ``decode_seconds`` (per pass: reading and
decoding its images' maps, summed over the decoding threads), ``rounds_per_pass``,
``passes`` (each pass's entry), ``load_average`` (the machine's 1-minute load when the run
ended); ``images`` (cached images, mirrors included), ``settings``, ``machine``.

    python -m bench.finetune_scales --json bench/results/finetune_scales.json   # ~400 images (the caches: ~20 min)
    python -m bench.finetune_scales --smoke                                     # 1 image + mirror, small scales
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.common import add_device_option, machine, print_table, write_json
from bench.detection import COLUMNS, Bench
from spp_detect.cache import FeatureCache
from spp_detect.device import resolve_device
from spp_detect.finetune import FinetuneSettings, run_finetune

DATASET = ("voc2007-trainval-plus", "trainval")
#: ``--smoke``: the same two columns at small scales (seconds to extract)
SMOKE_SCALES = {"1-scale": (128,), "5-scale": (96, 112, 128, 144, 160)}


def finetune_column(bench: Bench, column: str, scales, images: int, settings: FinetuneSettings) -> dict:
    """Cache ``images`` images and their mirrors at ``scales`` and fine-tune on them; the column's figures."""
    caches = [bench.cache(column, "spp", scales, *DATASET, limit=images, flip=flip) for flip in (False, True)]
    summary = run_finetune(caches, bench.work / f"finetune-scales-{column}", settings, device=bench.device, force=True)
    load = os.getloadavg()[0]  # the machine is shared: how busy it was (1-minute mean, at the end)
    pass_seconds = sum(p["seconds"] for p in summary.passes)
    per_100 = 100 / summary.iterations_run
    return {
        "scales": list(scales),
        "images": sum(len(FeatureCache(c).image_ids) for c in caches),
        "seconds_per_100_iterations": summary.seconds * per_100,
        "sgd_seconds_per_100_iterations": (summary.seconds - pass_seconds) * per_100,
        "decode_seconds": [p["decode_seconds"] for p in summary.passes],
        "rounds_per_pass": [p["rounds"] for p in summary.passes],
        "passes": summary.passes,
        "caches": [c.name for c in caches],
        "load_average": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200,
                        help="first images of the dataset (each cached with its mirror)")
    parser.add_argument("--iterations", type=int, default=300, help="fine-tuning iterations per column")
    parser.add_argument("--fc-dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per column, the columns alternated; the fastest of each counts (a shared machine)")
    add_device_option(parser)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-detection"))
    parser.add_argument("--smoke", action="store_true", help="1 image + mirror, small scales, 6 iterations: seconds")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    columns = {name: COLUMNS[name][1] for name in ("1-scale", "5-scale")}
    settings = FinetuneSettings(fc_dim=args.fc_dim, iterations=args.iterations)
    if args.smoke:
        args.images, columns = 1, SMOKE_SCALES
        settings = FinetuneSettings(fc_dim=16, iterations=6, round_iterations=2, batch_size=32)
        args.repeats = 1
        if args.work == parser.get_default("work"):
            args.work = Path(tempfile.mkdtemp(prefix="bench-finetune-scales-smoke-"))
    device = resolve_device(args.device)
    bench = Bench(args.work, device, None, 2, None)
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {name: [] for name in columns}
    for _ in range(args.repeats):
        for name, scales in columns.items():
            runs[name].append(finetune_column(bench, name, scales, args.images, settings))
    figures = {name: min(r, key=lambda f: f["seconds_per_100_iterations"]) for name, r in runs.items()}
    per_100 = {name: f["seconds_per_100_iterations"] for name, f in figures.items()}
    result = {
        "machine": machine(), "device": str(device), "device_given": args.device, "smoke": args.smoke,
        "dataset": "/".join(DATASET), "images": {name: f["images"] for name, f in figures.items()},
        "settings": asdict(settings), "flip": True,
        "seconds_per_100_iterations": per_100,
        "sgd_seconds_per_100_iterations": {name: f["sgd_seconds_per_100_iterations"] for name, f in figures.items()},
        "ratio_5_to_1": per_100["5-scale"] / per_100["1-scale"],
        "decode_seconds": {name: f["decode_seconds"] for name, f in figures.items()},
        "rounds_per_pass": {name: f["rounds_per_pass"] for name, f in figures.items()},
        "passes": {name: f["passes"] for name, f in figures.items()},
        "scales": {name: f["scales"] for name, f in figures.items()},
        "caches": {name: f["caches"] for name, f in figures.items()},
        "load_average": {name: f["load_average"] for name, f in figures.items()},
        "repeats": args.repeats,
        "all_seconds_per_100_iterations": {name: [f["seconds_per_100_iterations"] for f in r]
                                           for name, r in runs.items()},
        "stage_seconds": bench.times,
        "wall_seconds": time.perf_counter() - start,
    }
    rows = []
    for name, f in figures.items():
        rows.append((f"{name} ({f['images']} images)", f"{f['seconds_per_100_iterations']:7.1f} s / 100 iterations "
                     f"({f['sgd_seconds_per_100_iterations']:.1f} s of SGD), passes of {f['rounds_per_pass']} rounds, "
                     f"decoding {', '.join(f'{s:.1f}' for s in f['decode_seconds'])} s"))
    rows.append(("5-scale / 1-scale", f"{result['ratio_5_to_1']:.2f}x"))
    print_table(rows, f"fc-only fine-tuning, {settings.iterations} iterations of {settings.batch_size}, "
                      f"fc {settings.fc_dim}, rounds of {settings.round_iterations}, on {device}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
