"""Benchmark: which row the demo should train, chosen at the demo's size on a validation split.

The demo (``demo.sh``) trains on the 200 ``voc2007-mini`` trainval images at one scale and
tests on the first test images. Which SVM row wins depends on the training-set size (at 900
images, 1 scale, ``pool`` beats ``ftfc7 bb``: ``bench/results/detection.json``), so this
measures the candidates at 200 training images, **never on test**: train on the first 200
``voc2007-trainval-plus`` trainval images (plus their mirrors for the fine-tuned head),
validate on the 200 ``voc2007-mini`` trainval images (disjoint), 1 scale (688), every window,
the benchmark's recipes (``bench.detection.RECIPE``, ``--C auto``). It reports each row's
validation mAP and the train-svm time, the other cost the demo's time budget has to hold.

    python -m bench.demo_recipe [--json bench/results/demo_recipe.json]
    python -m bench.demo_recipe --smoke      # 2 images per list, seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path


from bench.common import add_device_option, machine, write_json
from bench.detection import BACKBONE, RECIPE, WEIGHTS, Bench, Recipe, _train_caches, load_detections
from spp_detect.datasets.voc import VOC_CLASSES
from spp_detect.show import sheet_counts
from spp_detect.device import resolve_device

TRAIN = ("voc2007-trainval-plus", "trainval")
VALIDATION = ("voc2007-mini", "trainval")
TRAIN_IMAGES = 200  # the demo's training-set size (voc2007-mini trainval)
ROWS = ("ftfc7 bb", "ftfc7", "pool", "pool bb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=TRAIN_IMAGES)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--windows", type=int, default=None,
                        help="only the first K proposals of each image (best first), training and validation")
    parser.add_argument("--fc-dim", type=int, default=RECIPE.finetune.fc_dim)
    parser.add_argument("--iterations", type=int, default=RECIPE.finetune.iterations)
    parser.add_argument("--no-flip", action="store_true", help="fine-tune without the mirrored images")
    parser.add_argument("--extract-precision", choices=("fp32", "bf16"), default="fp32",
                        help="the trunk's arithmetic (extract --precision)")
    parser.add_argument("--fc-precision", choices=("fp32", "bf16"), default="fp32",
                        help="fc6/fc7's arithmetic in train-svm and detect (their --precision)")
    parser.add_argument("--batch-size", type=int, default=RECIPE.finetune.batch_size, help="windows per minibatch")
    parser.add_argument("--lr", type=float, default=RECIPE.finetune.base_lr, help="base learning rate")
    parser.add_argument("--C-factor", type=float, default=1.0, help="the SVMs' C: this times what --C auto gives")
    parser.add_argument("--backbone", choices=tuple(WEIGHTS), default=BACKBONE,
                        help="the trunk (its ImageNet weights in ../shared/data/weights)")
    add_device_option(parser)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-detection"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    limit = None
    recipe = Recipe(replace(RECIPE.finetune, fc_dim=args.fc_dim, iterations=args.iterations, batch_size=args.batch_size,
                            base_lr=args.lr, lr_steps=(round(args.iterations * 0.75),)), flip=not args.no_flip)
    if args.smoke:
        limit, args.train_images = 2, 2
        if args.rows == parser.get_default("rows"):  # one fine-tuned row, one on the pooled vector
            args.rows = "ftfc7 bb,pool bb"
        recipe = Recipe(replace(RECIPE.finetune, fc_dim=64, iterations=20, lr_steps=(15,), round_iterations=10), flip=True)
        if args.work == parser.get_default("work"):
            args.work = Path(tempfile.mkdtemp(prefix="bench-demo-recipe-smoke-"))
    bench = Bench(args.work, resolve_device(args.device), limit, 2, None, extract_precision=args.extract_precision,
                  fc_precision=args.fc_precision)
    start = time.perf_counter()
    val_images = bench.images(*VALIDATION)
    column = "1-scale" + ("" if args.backbone == BACKBONE else f"-{args.backbone}")
    val = bench.cache(column, "spp", (688,), *VALIDATION, windows=args.windows, backbone=args.backbone)
    rows = args.rows.split(",")
    needs_head = any(not r.startswith("pool") for r in rows)
    if not needs_head:
        recipe = replace(recipe, flip=False)  # rows on pooled features: no head, no mirrored caches
    train, flipped = _train_caches(bench, column, "spp", (688,), (TRAIN,), recipe, limit=args.train_images,
                                   windows=args.windows, backbone=args.backbone)
    tag = (f"demo{args.train_images}" + ("" if args.backbone == BACKBONE else f"-{args.backbone}")
           + (f"-w{args.windows}" if args.windows else "") + bench.extract_tag)
    head = bench.head(train, recipe, tag, flipped) if needs_head else None
    cells = {}
    for row in rows:
        cells[row] = bench.row(train, head if not row.startswith("pool") else None, val, val_images, row, tag,
                               C_factor=args.C_factor)
        # what the demo's contact sheet would show on these images (score > 0, the best 3 each)
        cells[row]["sheet"] = sheet_counts(load_detections(bench.work / cells[row]["detections_folder"], VOC_CLASSES),
                                           val_images, VOC_CLASSES, threshold=0.0, top=3)
        sheet = cells[row]["sheet"]
        print(f"{row:>9}: validation mAP {100 * cells[row]['map']:5.1f}, train-svm {cells[row]['train_svm_seconds'] or 0:.0f} s,"
              f" sheet: {sheet['images_with_detections']}/{sheet['images']} images with a detection > 0,"
              f" {sheet['correct']}/{sheet['drawn']} drawn correct", flush=True)
    best = max(cells, key=lambda r: cells[r]["map"])
    result = {
        "machine": machine(), "smoke": args.smoke, "recipe": {"finetune": asdict(recipe.finetune), "flip": recipe.flip},
        "setting": (f"train on the first {len(bench.images(*TRAIN, limit=args.train_images))} images of {'/'.join(TRAIN)}"
                    f" (+ mirrors for the head), validate on {'/'.join(VALIDATION)} ({len(val_images)} images), "
                    f"1 scale (688), {f'the first {args.windows} windows' if args.windows else 'every window'}"),
        "backbone": args.backbone, "windows_per_image": args.windows, "extract_precision": args.extract_precision,
        "fc_precision": args.fc_precision,
        "rows": cells, "map": {r: c["map"] for r, c in cells.items()}, "best": best,
        "stage_seconds": bench.times, "wall_seconds": time.perf_counter() - start,
    }
    write_json(args.json, result)
    print(json.dumps(result["map"], indent=1), f"\nbest on validation: {best}")


if __name__ == "__main__":
    main()
