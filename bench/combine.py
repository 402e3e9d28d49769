"""Benchmark: model combination (SPP-net 4.4) of a SqueezeNet and a MobileNetV2 detector.

Both detectors are trained by the same stages on ``voc2007-mini`` trainval and tested on
its test split, in the detection benchmark's setting (the first ``--images`` images of
each split, the top ``--windows`` selective-search windows, 1 scale, fc7 SVMs with box
regression; stage folders under ``--work``). Then: each model alone, the paper's plain
union of SVM scores + NMS 0.3, and the union of scores calibrated per model and class on
the training images. Calibration and combination are the ``calibrate`` and ``combine``
stages the CLI runs (:func:`spp_detect.combine.run_calibrate`, :func:`run_combine`), each
calibration in its model's ``<svm>/calibration``, where ``spp-detect combine`` looks: the
command line gives the same files (tests/test_bench_smoke.py checks it).

    python -m bench.combine [--images 100] [--test-images 60] [--windows 200] [--json bench/results/combine.json]
    python -m bench.combine --smoke        # 3 + 2 images, a tiny head: seconds, for CI
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import SHARED_DATA, SQUEEZENET_FILE, VOC_ROOT, machine, smoke_args, write_json
from eval.results import ClassDetections
from eval.voc import evaluate_voc
from proposals.io import load_proposals
from proposals.run import ProposalSettings, run_proposals
from spp_detect.combine import CalibrateSettings, CombineSettings, run_calibrate, run_combine
from spp_detect.datasets.voc import VOC_CLASSES, read_voc
from spp_detect.detect import DetectSettings, load_detections, run_detect
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.finetune import FinetuneSettings, run_finetune
from spp_detect.stage_dir import read_manifest
from svm.train import SVMSettings, load_svm, run_train_svm

MOBILENET_FILE = SHARED_DATA / "weights" / "mobilenet_v2-imagenet1001-coral.pth"
MODELS = {"squeezenet1_0": SQUEEZENET_FILE, "mobilenet_v2": MOBILENET_FILE}
#: the row both detectors are run in: fc7 SVMs with box regression (paper Table 6, "ftfc7 bb")
DETECT = DetectSettings(bbox=True)


def _proposals(work: Path, split: str, images, windows: int) -> tuple[dict, str]:
    """Selective search (default settings) of ``images``, cut to the best ``windows``, and a key for them."""
    folder = work / f"proposals-{split}"
    run_proposals(images, folder, ProposalSettings(), {"year": "2007", "image_set": split}, workers=2, progress=False)
    boxes = load_proposals(folder, [im.image_id for im in images])
    return {k: v[:windows] for k, v in boxes.items()}, f"{read_manifest(folder)['key']}-first{windows}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--test-images", type=int, default=60)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--fc-dim", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--scales", default="688")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-detection"))
    parser.add_argument("--json", type=Path, default=None)
    args = smoke_args(parser, images=3, test_images=2, windows=30, fc_dim=32, iterations=20, scales="240")
    device = torch.device(args.device)
    scales = tuple(int(s) for s in args.scales.split(","))
    work = args.work
    start = time.perf_counter()
    train_images = read_voc(VOC_ROOT, "trainval")[: args.images]
    test_images = read_voc(VOC_ROOT, "test")[: args.test_images]
    train_props, train_key = _proposals(work, "trainval", train_images, args.windows)
    test_props, test_key = _proposals(work, "test", test_images, args.windows)
    tag = "1scale" if scales == (688,) else "x".join(map(str, scales))
    detections, folders = {}, []
    for backbone, weights in MODELS.items():
        name = tag if backbone == "squeezenet1_0" else f"{tag}-{backbone}"
        settings = ExtractSettings(backbone=backbone, weights=str(weights), scales=scales)
        caches = {}
        for split, images, props, key in (("trainval", train_images, train_props, train_key),
                                          ("test", test_images, test_props, test_key)):
            caches[split] = work / f"feat-{name}-{split}-{len(images)}-{args.windows}"
            run_extract(images, props, caches[split], settings, proposals_key=key, image_set=split, device=device)
        suffix = f"{args.images}-{args.windows}-{args.fc_dim}-{args.iterations}"
        head = work / f"head-{name}-{suffix}"
        run_finetune([caches["trainval"]], head, FinetuneSettings(fc_dim=args.fc_dim, iterations=args.iterations,
                     base_lr=0.02, lr_steps=(int(args.iterations * 0.75),)), device=device)
        svm = work / f"svm-{name}-fc7-{suffix}"
        run_train_svm([caches["trainval"]], svm, SVMSettings(layer="fc7", bbox=True), head_folder=head, device=device)
        model, model_key = load_svm(svm, device), read_manifest(svm)["key"]
        dets = work / f"dets-{name}-ftfc7bb-{len(test_images)}-{suffix}"
        run_detect(caches["test"], dets, model, DETECT, model_key=model_key, model_folder=svm, device=device)
        run_calibrate([caches["trainval"]], model, svm / "calibration", CalibrateSettings(detect=DETECT),
                      model_key=model_key, device=device)
        detections[backbone], folders = load_detections(dets, VOC_CLASSES), [*folders, dets]
    for scores in ("raw", "calibrated"):
        run_combine(folders, work / f"combined-{scores}-{tag}-{len(test_images)}", CombineSettings(scores=scores))

    def score(folder: Path) -> tuple[float, dict[str, float]]:
        arrays = load_detections(folder, VOC_CLASSES)
        result = evaluate_voc({n: ClassDetections(*a) for n, a in arrays.items()}, test_images)
        return result.map, dict(result.ap)

    maps, per_class = {}, {}
    for backbone, folder in zip(MODELS, folders):
        maps[backbone], per_class[backbone] = score(folder)
    for key, scores in (("union", "raw"), ("calibrated", "calibrated")):
        maps[key], per_class[key] = score(work / f"combined-{scores}-{tag}-{len(test_images)}")
    names = list(MODELS)
    better = {k: sum(per_class[k][c] > max(per_class[n][c] for n in names) for c in VOC_CLASSES) for k in ("union", "calibrated")}
    result = {
        "machine": machine(), "train_images": len(train_images), "test_images": len(test_images),
        "windows_per_image": args.windows, "scales": list(scales), "row": "ftfc7 bb", "svm_C": "auto",
        "map": maps, "per_class_ap": per_class, "smoke": args.smoke,
        "classes_better_than_both": better["calibrated"], "classes_better_than_both_union": better["union"],
        "wall_seconds": time.perf_counter() - start,
    }
    print(f"\nmAP (%), ftfc7 bb, scales {list(scales)}, {len(train_images)} trainval -> {len(test_images)} test images")
    for k, v in maps.items():
        print(f"  {k:>14}: {100 * v:5.1f}")
    print(f"\n{'class':<12}" + "".join(f"{k[:11]:>12}" for k in per_class))
    for c in VOC_CLASSES:
        print(f"{c:<12}" + "".join(f"{100 * per_class[k][c]:>12.1f}" for k in per_class))
    print(f"\nclasses where the combination beats both models: calibrated {better['calibrated']}, plain union {better['union']}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
