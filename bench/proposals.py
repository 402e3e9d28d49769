"""Benchmark the proposals stage: recall of non-difficult VOC ground truth, boxes, speed.

Runs the real stage (:func:`proposals.run_proposals`, the code behind
``spp-detect proposals``) on a VOC image set, then, for the first 100, 300, 1000 and 2000
boxes of every image and for all of its boxes ("all"), the fraction of non-difficult
ground-truth boxes covered by some box at IoU >= 0.5 and >= 0.7 (continuous IoU,
:func:`spp_detect.boxes.box_iou`). Files are ranked best first (the paper's order,
:mod:`proposals.selective_search`), so "top 100" is what ``--max-boxes 100`` would keep.

    .venv/bin/python -m bench.proposals --limit 60 --workers 2 --json bench/results/proposals-fast.json
    .venv/bin/python -m bench.proposals --mode opencv-quality --limit 30
    .venv/bin/python -m bench.proposals --smoke   # 4 images, seconds

Reference: selective search fast mode covers 98% of VOC2007 test objects at IoU 0.5 with
about 2,000 boxes per image (Uijlings et al., IJCV 2013; R-CNN). Timings are wall clock
on whatever else the machine is running; "s/image/worker" is the selective search call
alone, "wall s/image x workers" includes decoding, writing and worker start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from proposals.io import load_proposals
from proposals.run import ProposalSettings, run_proposals
from proposals.recall import TOP_K, proposal_recall
from spp_detect.datasets.voc import read_voc

from bench.common import REPO_ROOT, VOC_ROOT as DEFAULT_VOC_ROOT

SMOKE_IMAGES = 4


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voc-root", type=Path, default=DEFAULT_VOC_ROOT)
    parser.add_argument("--year", default="2007")
    parser.add_argument("--image-set", default="test")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the set")
    parser.add_argument("--mode", default="fast", choices=["fast", "opencv-fast", "opencv-quality"])
    parser.add_argument("--min-size", type=int, default=20)
    parser.add_argument("--max-boxes", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="proposals folder to (re)use; default: a temporary one")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help=f"only the first {SMOKE_IMAGES} images (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.limit = min(args.limit or SMOKE_IMAGES, SMOKE_IMAGES)

    images = read_voc(args.voc_root, args.image_set, args.year)[: args.limit]
    settings = ProposalSettings(mode=args.mode, min_size=args.min_size, max_boxes=args.max_boxes)
    with tempfile.TemporaryDirectory(prefix="bench-proposals-") as tmp:
        out = args.out or Path(tmp) / "proposals"
        start = time.perf_counter()
        summary = run_proposals(
            images, out, settings, {"year": args.year, "image_set": args.image_set}, workers=args.workers
        )
        wall = time.perf_counter() - start
        proposals = load_proposals(out, [image.image_id for image in images])

    all_boxes = max([len(b) for b in proposals.values()] + [1])
    table = proposal_recall(images, proposals, top_k=sorted({*TOP_K, all_boxes}))
    for row in table["recall"].values():  # "all": every box of the file (after --max-boxes)
        row["all"] = row[str(all_boxes)] if all_boxes in TOP_K else row.pop(str(all_boxes))
    counts = [len(b) for b in proposals.values()]
    result = {
        "voc_root": _display_path(args.voc_root),
        "image_set": args.image_set,
        "num_images": len(images),
        **asdict_settings(settings),
        "workers": summary.workers,
        "computed": summary.done,
        "num_objects": table["num_objects"],
        "recall": table["recall"],
        "mean_boxes_per_image": float(np.mean(counts)),
        "seconds_per_image_per_worker": summary.seconds_per_image_per_worker,
        "wall_seconds": wall,
        "wall_seconds_per_image_x_workers": wall * summary.workers / max(summary.done, 1),
        "platform": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
    }
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _display_path(path: Path) -> str:
    """``path`` relative to the repository root when it can be (no machine paths in results)."""
    try:
        return os.path.relpath(path.resolve(), REPO_ROOT)
    except ValueError:
        return str(path)


def asdict_settings(settings: ProposalSettings) -> dict:
    return {"mode": settings.mode, "min_size": settings.min_size, "max_boxes": settings.max_boxes, "seed": settings.seed}


def print_table(result: dict) -> None:
    print(
        f"\nselective search '{result['mode']}' on {result['num_images']} {result['image_set']} images, "
        f"{result['num_objects']} non-difficult objects"
    )
    columns = [str(k) for k in TOP_K] + ["all"]
    print("| recall | " + " | ".join(f"top {k}" if k != "all" else "all" for k in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in result["recall"].items():
        print(f"| IoU {name[3:]} | " + " | ".join(f"{row[k]:.3f}" for k in columns) + " |")
    print(
        f"mean boxes/image {result['mean_boxes_per_image']:.1f}; "
        f"{result['seconds_per_image_per_worker']:.2f} s/image/worker (selective search), "
        f"wall {result['wall_seconds']:.1f} s with {result['workers']} workers "
        f"({result['wall_seconds_per_image_x_workers']:.2f} s/image x workers)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
