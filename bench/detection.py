"""Benchmark: the whole detector, shaped like the paper's Table 6 (SPP-net 4.3).

Trains on ``voc2007-mini`` trainval and tests on its test split, for three feature
columns that share everything else (proposals, head recipe, SVM recipe, box regression):

* ``1-scale``: SPP at scale 688 (paper 4.1's 1-scale setting);
* ``5-scale``: SPP at scales 480, 576, 688, 864, 1200;
* ``rcnn-style``: R-CNN's crop-warp features of the same trunk (each window cropped with
  16 px of context, warped to 224, run through the trunk alone), its map pooled whole
  with the same pyramid (``extract --mode crop-warp``).

Rows: ``pool`` (SVMs on the pooled vector), ``ftfc6`` and ``ftfc7`` (SVMs on the
fine-tuned head's fc6 / fc7), ``ftfc7 bb`` (fc7 plus box regression).

R-CNN-style features cost one trunk pass per window (~15 ms here), so every column is
run on the same reduced setting: the top ``--windows`` proposals per image (selective
search, the paper's fast mode; the top 200 cover ~45% of the test objects at IoU 0.5,
all ~1,700 cover 96%), the first ``--images`` trainval and ``--test-images`` test images. The SVM
cost ``C`` is the release's 0.001 scaled by 5,011 / (training images): the release's C
balances hinge loss against the regulariser for VOC07's 5,011 trainval images, and the
objective's loss term shrinks with the number of samples (C = 0.05 at 100 images).

Defaults (100 trainval + 60 test images, 200 windows, fc 1024, 400 iterations) take about
25 minutes on the 2-core CPU when it is otherwise idle, most of it the R-CNN-style column;
``--full`` (200 + 200 images, 300 windows, 1,000 iterations) takes over an hour. Stage folders live under ``--work`` and are reused by a rerun (keyed).

    python -m bench.detection [--images 100] [--test-images 60] [--windows 200] [--json bench/results/detection.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import SQUEEZENET_FILE, VOC_ROOT, machine, write_json
from eval.results import ClassDetections
from eval.voc import evaluate_voc
from proposals.io import load_proposals
from proposals.run import ProposalSettings, run_proposals
from spp_detect.cache import FeatureCache
from spp_detect.datasets.voc import VOC_CLASSES, read_voc
from spp_detect.detect import DetectSettings, load_detections, run_detect
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.finetune import FinetuneSettings, run_finetune
from spp_detect.head import load_head
from spp_detect.stage_dir import read_manifest
from spp_detect.window_features import window_features
from spp_detect.windows import PAPER_SCALES
from svm.train import SVMSettings, load_svm, run_train_svm

COLUMNS = {"1-scale": ("spp", (688,)), "5-scale": ("spp", PAPER_SCALES), "rcnn-style": ("crop-warp", (224,))}
ROWS = {"pool": ("pool", False), "ftfc6": ("fc6", False), "ftfc7": ("fc7", False), "ftfc7 bb": ("fc7", True)}
RELEASE_C, RELEASE_TRAIN_IMAGES = 1e-3, 5011  # spp_train.m -c 0.001, on VOC07 trainval


def _proposals(work: Path, split: str, images, windows: int) -> tuple[dict[str, np.ndarray], str]:
    folder = work / f"proposals-{split}"
    if not all((folder / f"{im.image_id}.npy").is_file() for im in images):  # reuse a finished folder as it is
        run_proposals(images, folder, ProposalSettings(mode="fast"), {"year": "2007", "image_set": split}, workers=2)
    boxes = load_proposals(folder, [im.image_id for im in images])
    return {k: v[:windows] for k, v in boxes.items()}, f"{read_manifest(folder)['key']}-top{windows}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100, help="trainval images (the first N)")
    parser.add_argument("--test-images", type=int, default=60, help="test images (the first N)")
    parser.add_argument("--windows", type=int, default=200, help="top selective-search windows per image, all columns")
    parser.add_argument("--fc-dim", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--full", action="store_true", help="200 + 200 images, 300 windows, 1,000 iterations")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-detection"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.full:
        args.images, args.test_images, args.windows, args.iterations = 200, 200, 300, 1000
    device = torch.device(args.device)
    work = args.work
    train_images = read_voc(VOC_ROOT, "trainval")[: args.images]
    test_images = read_voc(VOC_ROOT, "test")[: args.test_images]
    svm_c = RELEASE_C * RELEASE_TRAIN_IMAGES / len(train_images)
    result: dict[str, object] = {
        "machine": machine(), "device": str(device), "train_images": len(train_images), "test_images": len(test_images),
        "windows_per_image": args.windows, "fc_dim": args.fc_dim, "finetune_iterations": args.iterations,
        "svm_C": svm_c, "backbone": "squeezenet1_0", "map": {row: {} for row in ROWS}, "seconds": {},
        "per_class_ap": {}, "per_image_seconds": {}, "training_seconds": {},
    }
    start_all = time.perf_counter()
    t0 = time.perf_counter()
    train_props, train_key = _proposals(work, "trainval", train_images, args.windows)
    test_props, test_key = _proposals(work, "test", test_images, args.windows)
    result["training_seconds"]["proposals_both_splits"] = time.perf_counter() - t0

    for column in args.columns.split(","):
        mode, scales = COLUMNS[column]
        tag = column.replace("-", "")
        settings = ExtractSettings(backbone="squeezenet1_0", weights=str(SQUEEZENET_FILE), scales=scales, mode=mode)
        caches = {}
        conv_seconds = {}
        for split, images, props, key in (("trainval", train_images, train_props, train_key),
                                          ("test", test_images, test_props, test_key)):
            folder = work / f"feat-{tag}-{split}-{len(images)}-{args.windows}"
            s = run_extract(images, props, folder, settings, proposals_key=key, image_set=split, device=device)
            if s.done:
                conv_seconds[split] = s.seconds / s.done
            caches[split] = folder
        if "test" not in conv_seconds:  # the caches existed: time the extract stage on a few test images
            with tempfile.TemporaryDirectory() as tmp:
                s = run_extract(test_images[:3], test_props, Path(tmp) / "feat", settings, proposals_key=test_key,
                                image_set="test", device=device)
            conv_seconds["test"] = s.seconds / s.done
        times = result["training_seconds"].setdefault(column, {})
        times["extract_s_per_image"] = conv_seconds.get("test", conv_seconds.get("trainval"))
        t0 = time.perf_counter()
        head_dir = work / f"head-{tag}-{args.images}-{args.windows}-{args.fc_dim}-{args.iterations}"
        ft = FinetuneSettings(fc_dim=args.fc_dim, iterations=args.iterations, base_lr=0.02,
                              lr_steps=(int(args.iterations * 0.75),))
        run_finetune([caches["trainval"]], head_dir, ft, device=device)
        times["finetune"] = time.perf_counter() - t0
        for row, (layer, bbox) in ROWS.items():
            svm_dir = work / f"svm-{tag}-{layer}-{args.images}-{args.windows}-{args.fc_dim}-{args.iterations}"
            t0 = time.perf_counter()
            svm_settings = SVMSettings(layer=layer, C=svm_c, bbox=layer == "fc7")
            run_train_svm([caches["trainval"]], svm_dir, svm_settings, head_folder=None if layer == "pool" else head_dir,
                          device=device)
            if not bbox:
                times[f"train_svm_{layer}"] = time.perf_counter() - t0
            model = load_svm(svm_dir, device)
            det_dir = work / f"dets-{tag}-{row.replace(' ', '')}-{len(test_images)}-{args.images}-{args.windows}-{args.fc_dim}-{args.iterations}"
            summary = run_detect(caches["test"], det_dir, model, DetectSettings(bbox=bbox),
                                 model_key=read_manifest(svm_dir)["key"], device=device)
            per_class = load_detections(det_dir, VOC_CLASSES)
            dets = {name: ClassDetections(*arrays) for name, arrays in per_class.items()}
            evaluation = evaluate_voc(dets, test_images)
            result["map"][row][column] = evaluation.map
            result["per_class_ap"].setdefault(row, {})[column] = dict(evaluation.ap)
            if summary.done:
                result["seconds"].setdefault(column, {})[row] = {k: v / summary.done for k, v in summary.timings.items()}
            print(f"{column:>10} {row:>9}: mAP {100 * evaluation.map:5.1f}", flush=True)
        result["per_image_seconds"][column] = _per_image_split(FeatureCache(caches["test"]), load_head(head_dir), conv_seconds.get("test"), device)
    best_row, best_col = max(((r, c) for r in result["map"] for c in result["map"][r]), key=lambda rc: result["map"][rc[0]][rc[1]])
    result["best"] = {"row": best_row, "column": best_col, "per_class_ap": result["per_class_ap"][best_row][best_col]}
    result["wall_seconds"] = time.perf_counter() - start_all
    _print_table(result)
    write_json(args.json, result)


def _per_image_split(cache: FeatureCache, head, conv_s: float | None, device, images: int = 10) -> dict[str, float]:
    """Per-image seconds of the test path on the first ``images`` test images: map decode,
    pooling every window, fc6 + fc7, scoring (20 linear SVMs), and conv (the extract stage's
    time per image, cache write included)."""
    decode = pool = fc = score = 0.0
    ids = cache.image_ids[:images]
    head = head.to(device)
    for image_id in ids:
        t0 = time.perf_counter()
        image = cache.load(image_id)
        t1 = time.perf_counter()
        window_features(image, "pool", None, device=device)
        t2 = time.perf_counter()
        feats = window_features(image, "fc7", head, device=device)
        t3 = time.perf_counter()
        scores = feats @ torch.zeros((feats.shape[1], len(VOC_CLASSES)))  # 20 linear SVMs
        torch.nonzero(scores > -1.5)
        t4 = time.perf_counter()
        decode, pool, fc, score = decode + t1 - t0, pool + t2 - t1, fc + max(0.0, (t3 - t2) - (t2 - t1)), score + t4 - t3
    n = len(ids)
    out = {"decode": decode / n, "pooling": pool / n, "fc": fc / n, "scoring": score / n}
    if conv_s is not None:
        out["conv"] = conv_s
    out["total"] = sum(out.values())
    return out


def _print_table(result: dict) -> None:
    columns = [c for c in COLUMNS if any(c in result["map"][r] for r in ROWS)]
    print(f"\nmAP (VOC07 11-point, %) on {result['test_images']} test images, top {result['windows_per_image']} windows, "
          f"trained on {result['train_images']} trainval images, SqueezeNet, fc {result['fc_dim']}")
    print(f"{'':>10} " + " ".join(f"{c:>11}" for c in columns))
    for row in ROWS:
        print(f"{row:>10} " + " ".join(f"{100 * result['map'][row].get(c, float('nan')):>11.1f}" for c in columns))
    print("\nper-image seconds on the test path:")
    for column, split in result["per_image_seconds"].items():
        print(f"  {column:>10}: " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()))
    print(f"\ntraining-stage seconds: {result['training_seconds']}")
    print(f"wall: {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
