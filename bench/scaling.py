"""Benchmark: per-image stage times, and the wall time they imply for full datasets on G devices.

Measures, on the first ``--images`` VOC07 test images with ``--windows`` windows each
(random boxes plus jittered copies of the ground truth, so fine-tuning has foreground):

* ``extract`` at 1 scale (688) and 5 scales (the paper's), per image, and the cache's
  MB per image;
* ``finetune``: seconds per iteration of 128 windows (pooling of the round included),
  fc6/fc7 of ``--fc-dim``;
* ``train-svm`` (fc7 features, one positives pass + one mining pass) and ``detect``
  (fc7, NMS), per image.

It then estimates the wall time of each stage for VOC2007 (5,011 trainval + 4,952 test =
9,963 images) and COCO (118,287 train2017 + 5,000 val2017 = 123,287 images) on 1, 2, 4,
8 and 32 processes as ``images x s/image / G`` (proposals and extract over all images,
detect over the test split; finetune ``iterations x s/iteration / G``; train-svm in one
process, G-independent), and the disk of the 1- and 5-scale caches. The model ignores
start-up and all-reduce time; per-image times are the mean over the images measured
(VOC images; COCO's have ~1.6x the pixels, so its extract figures are a lower bound).

Selective search runs on CPU cores only: its time is the committed
``bench/results/proposals-fast.json`` (s/image/worker on this machine).

    python -m bench.scaling [--images 3] [--windows 2000] [--fc-dim 4096] [--device auto] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import (REPO_ROOT, SQUEEZENET_FILE, VOC_ROOT, add_device_option, machine, print_table, proposals_file,
                          smoke_args, write_json)
from spp_detect.cache import FeatureCache
from spp_detect.datasets.voc import read_voc
from spp_detect.detect import DetectSettings, run_detect
from spp_detect.device import resolve_device
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.finetune import FinetuneSettings, run_finetune
from spp_detect.windows import PAPER_SCALES
from svm.train import SVMSettings, run_train_svm

DATASETS = {"voc2007": {"train": 5011, "test": 4952}, "coco": {"train": 118287, "test": 5000}}
DEVICES = (1, 2, 4, 8, 32)
ITERATIONS = {"default": 3000, "release": 90000}  # cli default; spp_finetune_voc.m: 3 x 30k


def _windows(images, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for im in images:
        size = np.array([im.width, im.height], dtype=np.float64)
        xy = rng.uniform(0, 1, (count, 2)) * (size - 20)
        wh = 20 + rng.uniform(0, 1, (count, 2)) * (size - 20 - xy)
        boxes = [np.concatenate([xy, xy + wh], axis=1)]
        for box in im.boxes:
            jitter = rng.uniform(-0.1, 0.1, (10, 4)) * np.tile(box[2:] - box[:2], 2)
            boxes.append(np.clip(box + jitter, 0, np.concatenate([size, size]) - 1))
        out[im.image_id] = np.concatenate(boxes).astype(np.float32)
    return out


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3, help="first N VOC07 test images")
    parser.add_argument("--windows", type=int, default=2000, help="random windows per image (R-CNN: ~2,000)")
    parser.add_argument("--fc-dim", type=int, default=4096, help="fc6/fc7 width (paper: 4096)")
    parser.add_argument("--ft-iterations", type=int, default=4, help="fine-tuning iterations timed")
    add_device_option(parser, default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = smoke_args(parser, images=1, windows=50, fc_dim=64, ft_iterations=1)

    load_before = os.getloadavg()[0]
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    images = read_voc(VOC_ROOT, "test")[: args.images]
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    windows = proposals_file(work / "proposals.mat", _windows(images, args.windows))
    per_image: dict[str, float] = {}
    mb_per_image: dict[str, float] = {}
    caches = {}
    for name, scales in {"1scale": (688,), "5scale": PAPER_SCALES}.items():
        caches[name] = work / f"feat-{name}"
        settings = ExtractSettings(weights=str(SQUEEZENET_FILE), scales=scales)
        run_extract(images[:1], windows, work / f"warm-{name}", settings, image_set="test", device=device)
        sync()
        summary = run_extract(images, windows, caches[name], settings, image_set="test", device=device)
        sync()
        per_image[f"extract_{name}"] = summary.seconds / summary.done
        mb_per_image[name] = summary.bytes_written / summary.done / 1e6
        print(f"extract {name}: {per_image[f'extract_{name}']:.3f} s/image, {mb_per_image[name]:.2f} MB/image")

    cache = caches["5scale"]
    head = work / "head"
    ft = FinetuneSettings(fc_dim=args.fc_dim, iterations=args.ft_iterations, round_iterations=args.ft_iterations)
    trained = run_finetune([cache], head, ft, device=device)  # its seconds: the loop, pooling of the round included
    sync()
    seconds_per_iteration = trained.seconds / args.ft_iterations
    print(f"finetune: {seconds_per_iteration:.3f} s/iteration (128 windows, fc {args.fc_dim})")

    svm = work / "svm"
    summary = run_train_svm([cache], svm, SVMSettings(layer="fc7", C=0.05), head_folder=head, device=device)
    sync()
    per_image["train_svm_fc7"] = summary.seconds / len(images)
    print(f"train-svm: {per_image['train_svm_fc7']:.3f} s/image")
    dets = run_detect(cache, svm, work / "dets", DetectSettings(), device=device)
    sync()
    per_image["detect_fc7"] = dets.seconds / dets.done
    print(f"detect: {per_image['detect_fc7']:.3f} s/image")

    ss = json.loads((REPO_ROOT / "bench" / "results" / "proposals-fast.json").read_text())
    per_image["proposals_per_cpu_worker"] = ss["seconds_per_image_per_worker"]

    estimates: dict[str, dict[str, dict[str, float]]] = {}
    for dataset, split in DATASETS.items():
        total = split["train"] + split["test"]
        rows: dict[str, dict[str, float]] = {}
        for g in DEVICES:
            rows[str(g)] = {
                "extract_1scale_s": total * per_image["extract_1scale"] / g,
                "extract_5scale_s": total * per_image["extract_5scale"] / g,
                "finetune_default_s": ITERATIONS["default"] * seconds_per_iteration / g,
                "finetune_release_s": ITERATIONS["release"] * seconds_per_iteration / g,
                "train_svm_s": split["train"] * per_image["train_svm_fc7"],
                "detect_s": split["test"] * per_image["detect_fc7"] / g,
            }
        estimates[dataset] = {
            "images": total,
            "proposals_cpu_core_hours": total * per_image["proposals_per_cpu_worker"] / 3600,
            "cache_gb_1scale": total * mb_per_image["1scale"] / 1e3,
            "cache_gb_5scale": total * mb_per_image["5scale"] / 1e3,
            "by_processes": rows,
        }
        table = [(f"G = {g}", "  ".join(f"{k[:-2]} {_hours(v)}" for k, v in r.items())) for g, r in rows.items()]
        print_table(table, f"{dataset}: {total} images, caches {estimates[dataset]['cache_gb_1scale']:.0f} / "
                           f"{estimates[dataset]['cache_gb_5scale']:.0f} GB (1 / 5 scales)")

    write_json(args.json, {
        "date": datetime.date.today().isoformat(),
        "device": str(device),
        "machine": machine(),
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0], "cpus": os.cpu_count()},
        "images": len(images),
        "windows_per_image": float(np.mean([len(FeatureCache(cache).load(i.image_id, scales=()).boxes) for i in images])),
        "fc_dim": args.fc_dim,
        "seconds_per_image": per_image,
        "seconds_per_finetune_iteration": seconds_per_iteration,
        "cache_mb_per_image": mb_per_image,
        "estimates": estimates,
    })


if __name__ == "__main__":
    main()
