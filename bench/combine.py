"""Benchmark: model combination (SPP-net 4.4) of a SqueezeNet and a MobileNetV2 detector.

Both detectors are trained in the detection benchmark's setting, by its stages
(:class:`bench.detection.Bench`, folders under ``--work``: SqueezeNet's are those of
``bench.detection``'s 1-scale column, reused when that has run): all 900 training images
(``voc2007-mini`` trainval + ``voc2007-trainval-plus`` trainval), all 200 ``voc2007-mini``
test images, **every** proposal window, one scale (688), SVMs with ``--C auto``, in one row
of Table 6 (``--row``; default ``pool``, the best 1-scale row of
``bench/results/detection.json`` at 900 images). Then: each model alone, the paper's plain
union of SVM scores + NMS 0.3 (``union``), and the union of scores calibrated per model and
class on the training images (``calibrated``). Calibration and combination are the
``calibrate`` and ``combine`` stages the CLI runs (:func:`spp_detect.combine.run_calibrate`,
:func:`run_combine`), each calibration in its model's ``<svm>/calibration``, where
``spp-detect combine`` looks: the command line gives the same files
(tests/test_bench_smoke.py checks it).

    python -m bench.combine [--row pool] [--json bench/results/combine.json]
    python -m bench.combine --smoke        # 2 images per list: seconds, for CI
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import bench.detection as detection
from bench.common import add_device_option, machine, smoke_args, write_json
from spp_detect.combine import CalibrateSettings, CombineSettings, run_calibrate, run_combine
from spp_detect.datasets.voc import VOC_CLASSES
from spp_detect.detect import DetectSettings
from spp_detect.device import resolve_device

#: backbone -> the column name its folders carry (SqueezeNet's is bench.detection's own)
MODELS = {"squeezenet1_0": "1-scale", "mobilenet_v2": "1-scale-mobilenet_v2"}
SCALES = (688,)  # paper 4.1's single scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", default="pool", choices=list(detection.ROWS),
                        help="the Table 6 row both detectors are trained in [default: pool]")
    parser.add_argument("--limit", type=int, default=None, help="first N images of each list [default: all]")
    add_device_option(parser)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-detection"))
    parser.add_argument("--json", type=Path, default=None)
    args = smoke_args(parser, limit=2)
    if args.smoke:  # a head of a few iterations, for rows that fine-tune
        detection.RECIPE = detection.Recipe(replace(
            detection.RECIPE.finetune, fc_dim=32, iterations=20, lr_steps=(15,), round_iterations=10), flip=True)
    device = resolve_device(args.device)
    bench = detection.Bench(args.work, device, args.limit, workers=2)
    layer, bbox = detection.ROWS[args.row]
    start = time.perf_counter()
    test_images = bench.images(*detection.TEST_SET)
    train_images = sum(len(bench.images(*s)) for s in detection.TRAIN_SETS)
    cells, folders = {}, []
    for backbone, column in MODELS.items():
        # the row's training caches (and their mirrored twins if the row fine-tunes a head)
        recipe = detection.RECIPE if layer != "pool" else replace(detection.RECIPE, flip=False)
        train, flipped = detection._train_caches(bench, column, "spp", SCALES, detection.TRAIN_SETS, recipe,
                                                 backbone=backbone)
        test = bench.cache(column, "spp", SCALES, *detection.TEST_SET, backbone=backbone)
        head = bench.head(train, recipe, column, flipped) if layer != "pool" else None
        cells[backbone] = cell = bench.row(train, head, test, test_images, args.row, column)
        svm = args.work / cell["svm_folder"]
        t0 = time.perf_counter()
        calibration = run_calibrate(train, svm, svm / "calibration", CalibrateSettings(detect=DetectSettings(bbox=bbox)),
                                    device=device)
        cell["calibrate_seconds"] = None if calibration.already_done else time.perf_counter() - t0
        folders.append(args.work / cell["detections_folder"])
        print(f"{backbone:>14} {args.row}: mAP {100 * cell['map']:5.1f}", flush=True)
    tag = f"{args.row.replace(' ', '')}-{train_images}-{len(test_images)}"
    for scores in ("raw", "calibrated"):
        run_combine(folders, args.work / f"combined-{scores}-{tag}", CombineSettings(scores=scores))

    maps = {backbone: cell["map"] for backbone, cell in cells.items()}
    per_class = {backbone: cell["per_class_ap"] for backbone, cell in cells.items()}
    for key, scores in (("union", "raw"), ("calibrated", "calibrated")):
        evaluation = detection.evaluate_folder(args.work / f"combined-{scores}-{tag}", test_images)
        maps[key], per_class[key] = evaluation.map, dict(evaluation.ap)
    names = list(MODELS)
    better = {k: sum(per_class[k][c] > max(per_class[n][c] for n in names) for c in VOC_CLASSES) for k in ("union", "calibrated")}
    result = {
        "machine": machine(), "train_images": train_images, "test_images": len(test_images),
        "windows_per_image": "all (up to 2,000)", "scales": list(SCALES), "row": args.row, "svm_C": "auto",
        "map": maps, "per_class_ap": per_class, "smoke": args.smoke, "models": cells,
        "combined_inputs": [folder.name for folder in folders],  # in the order given to combine
        "classes_better_than_both": better["calibrated"], "classes_better_than_both_union": better["union"],
        "calibrated_minus_better_single": maps["calibrated"] - max(maps[n] for n in names),
        "wall_seconds": time.perf_counter() - start,
    }
    print(f"\nmAP (%), {args.row}, scales {list(SCALES)}, {train_images} training -> {len(test_images)} test images, "
          "every window")
    for k, v in maps.items():
        print(f"  {k:>14}: {100 * v:5.1f}")
    print(f"\n{'class':<12}" + "".join(f"{k[:11]:>12}" for k in per_class))
    for c in VOC_CLASSES:
        print(f"{c:<12}" + "".join(f"{100 * per_class[k][c]:>12.1f}" for k in per_class))
    print(f"\nclasses where the combination beats both models: calibrated {better['calibrated']}, plain union {better['union']}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
