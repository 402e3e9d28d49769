"""Benchmark of the evaluate stage on the 200 VOC2007 test images of ../shared/data/voc2007-mini.

Detections: per class, jittered ground-truth boxes (all objects of the class, several
jitter levels) topped up with random boxes in random images to ``--per-class``
detections (default 10,000, so 20 x 10,000 = 200,000), seeded.

Timed:
* ``evaluate_voc`` (vectorised devkit, 11-point; also area AP and the py-faster-rcnn rule);
* a straightforward per-detection loop (the devkit's algorithm as written) on a subset,
  to show the speed-up, and checked to give the same APs there;
* ``evaluate_coco`` (pycocotools) on all detections;
* writing and reading the devkit result files.

Usage: ``.venv/bin/python -m bench.eval [--per-class 10000] [--json bench/results/eval.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from eval.coco import evaluate_coco
from eval.results import ClassDetections, read_voc_results, write_voc_results
from eval.voc import evaluate_voc, voc07_recall_thresholds
from spp_detect.datasets.voc import VOC_CLASSES, read_voc

from bench.common import VOC_ROOT, smoke_args


def make_detections(images, per_class: int, seed: int) -> dict[str, ClassDetections]:
    """``per_class`` detections per class: jittered ground truth, then random boxes."""
    rng = np.random.default_rng(seed)
    sizes = np.array([[im.width, im.height, im.width, im.height] for im in images], dtype=float)
    detections = {}
    for label, name in enumerate(VOC_CLASSES):
        gt_image, gt_boxes = [], []
        for index, image in enumerate(images):
            boxes = image.boxes[image.labels == label].astype(float)
            gt_image += [index] * len(boxes)
            gt_boxes.append(boxes)
        gt_image = np.array(gt_image, dtype=np.int64)
        gt_boxes = np.concatenate(gt_boxes)
        copies = min(8, per_class // max(len(gt_boxes), 1))
        image_index = np.repeat(gt_image, copies)
        boxes = np.repeat(gt_boxes, copies, axis=0)
        wh = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
        boxes = boxes + rng.normal(0, 1, boxes.shape) * rng.uniform(0.02, 0.4, (len(boxes), 1)) * wh
        num_random = per_class - len(boxes)
        random_image = rng.integers(len(images), size=num_random)
        corners = rng.uniform(0, 1, (num_random, 4)) * sizes[random_image]
        random_boxes = np.concatenate(
            [np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])], axis=1
        )
        image_index = np.concatenate([image_index, random_image])
        boxes = np.clip(np.concatenate([boxes, random_boxes]), 0, sizes[image_index])
        # jittered boxes mostly above random ones; 3 decimals, like py-faster-rcnn files: ties
        scores = np.concatenate([rng.uniform(0.3, 1.0, per_class - num_random), rng.uniform(0.0, 0.7, num_random)])
        scores = np.round(scores, 3)
        ids = np.array([images[i].image_id for i in image_index])
        detections[name] = ClassDetections(ids, scores, boxes)
    return detections


def loop_voc_eval(dets: ClassDetections, images, label: int) -> float:
    """The devkit's algorithm as written (VOCevaldet.m): one Python loop per detection."""
    gt = {}
    npos = 0
    for image in images:
        mask = image.labels == label
        boxes = image.boxes[mask].astype(float)
        boxes[:, :2] += 1  # devkit frame
        gt[image.image_id] = (boxes.tolist(), image.difficult[mask].tolist(), [False] * int(mask.sum()))
        npos += int((~image.difficult[mask]).sum())
    order = sorted(range(len(dets)), key=lambda k: -dets.scores[k])
    boxes_devkit = dets.boxes.copy()
    boxes_devkit[:, :2] += 1
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for d, k in enumerate(order):
        bb = boxes_devkit[k].tolist()
        gt_boxes, difficult, taken = gt[str(dets.image_ids[k])]
        ovmax, jmax = -np.inf, -1
        for j, g in enumerate(gt_boxes):
            iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
            ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
            if iw > 0 and ih > 0:
                ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - iw * ih
                if iw * ih / ua > ovmax:
                    ovmax, jmax = iw * ih / ua, j
        if ovmax >= 0.5:
            if not difficult[jmax]:
                if not taken[jmax]:
                    tp[d], taken[jmax] = 1, True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in voc07_recall_thresholds("devkit"):
        ap = ap + (prec[rec >= t].max() if (rec >= t).any() else 0.0) / 11
    return ap


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc-root", type=Path, default=VOC_ROOT)
    parser.add_argument("--per-class", type=int, default=10_000, help="detections per class")
    parser.add_argument("--loop-per-class", type=int, default=2000, help="detections per class for the loop reference")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-coco", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = smoke_args(parser, per_class=200, loop_per_class=50, repeats=1)

    images = read_voc(args.voc_root, "test")
    detections = make_detections(images, args.per_class, args.seed)
    total = sum(len(d) for d in detections.values())
    rows = []

    def add(name, times, n, note=""):
        rows.append({"what": name, "detections": n, "best_s": min(times), "median_s": statistics.median(times),
                     "repeats": len(times), "note": note})

    result, times = timed(lambda: evaluate_voc(detections, images), args.repeats)
    add("evaluate_voc devkit 11point", times, total, f"mAP {result.map:.4f}")
    _, times = timed(lambda: evaluate_voc(detections, images, use_07_metric=False), args.repeats)
    add("evaluate_voc devkit area", times, total)
    _, times = timed(lambda: evaluate_voc(detections, images, rule="py-faster-rcnn"), args.repeats)
    add("evaluate_voc py-faster-rcnn 11point", times, total)

    pick = np.sort(np.random.default_rng(args.seed).permutation(args.per_class)[: args.loop_per_class])
    subset = {n: ClassDetections(d.image_ids[pick], d.scores[pick], d.boxes[pick]) for n, d in detections.items()}
    n_subset = sum(len(d) for d in subset.values())
    fast, fast_times = timed(lambda: evaluate_voc(subset, images), args.repeats)
    loop_aps, loop_times = timed(lambda: [loop_voc_eval(subset[n], images, i) for i, n in enumerate(VOC_CLASSES)], 1)
    max_diff = max(abs(a - fast.ap[n]) for a, n in zip(loop_aps, VOC_CLASSES))
    add("evaluate_voc (subset)", fast_times, n_subset)
    add("per-detection loop (subset)", loop_times, n_subset,
        f"{min(loop_times) / min(fast_times):.0f}x slower; max |AP diff| {max_diff:.1e}")

    if not args.skip_coco:
        coco, times = timed(lambda: evaluate_coco(detections, images), 1)
        add("evaluate_coco (pycocotools)", times, total, f"AP {coco.stats['AP']:.4f} AP50 {coco.stats['AP50']:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        _, times = timed(lambda: write_voc_results(detections, tmp, "test"), 1)
        add("write devkit files", times, total)
        _, times = timed(lambda: read_voc_results(tmp, "test"), 1)
        add("read devkit files", times, total)

    print(f"{len(images)} images, {total} detections ({args.per_class} per class), seed {args.seed}, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'what':<38} {'detections':>10} {'best s':>8} {'median s':>9}  note")
    for r in rows:
        print(f"{r['what']:<38} {r['detections']:>10d} {r['best_s']:>8.3f} {r['median_s']:>9.3f}  {r['note']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"images": len(images), "detections": total, "per_class": args.per_class,
                                         "seed": args.seed, "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
