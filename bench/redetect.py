"""Check: re-run ``detect`` on every detection folder of a finished ``bench.detection`` work
folder with the current code, and compare with the stored per-image results, array for
array (boxes, scores, labels). Identical results mean an unchanged mAP: this is how a
change to the feature path (pooling kernel, batching, buffers) is shown not to move
the detection benchmark. With ``--precision bf16`` the folders of fine-tuned heads are
re-run with bf16 fc layers instead, and the VOC07 mAP of both is reported (the option's
accuracy cost), with the fc seconds per image of each.

    python -m bench.redetect [--work runs/bench-detection] [--precision fp32] [--json bench/results/redetect.json]
    python -m bench.redetect --smoke     # makes a tiny work folder first (2 + 2 images, pool SVMs): seconds

About 3 minutes for the 17 folders of runs/bench-detection here (60-100 test images each).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import SQUEEZENET_FILE, VOC_ROOT, add_device_option, machine, proposals_file, smoke_args, write_json
from eval.voc import evaluate_voc
from spp_detect.datasets.voc import VOC_CLASSES, read_voc
from spp_detect.detect import DetectSettings, load_detections, run_detect
from spp_detect.device import resolve_device
from spp_detect.stage_dir import read_manifest, settings_from_config
from svm.train import load_svm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-detection"))
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    add_device_option(parser)
    parser.add_argument("--json", type=Path, default=None)
    args = smoke_args(parser)
    device = resolve_device(args.device)
    if args.smoke:
        _smoke_work(args.work, device)
    keyed = lambda pattern: {read_manifest(p)["key"]: p for p in args.work.glob(pattern)  # noqa: E731
                             if (p / "manifest.json").is_file()}
    caches, models = keyed("feat-*"), keyed("svm-*")
    result: dict[str, object] = {"machine": machine(), "device": str(device), "device_given": args.device,
                                 "work": str(args.work), "precision": args.precision,
                                 "folders": {}}
    test_images = {im.image_id: im for im in read_voc(VOC_ROOT, "test")}
    for det in sorted(args.work.glob("dets-*")):
        config = read_manifest(det)["config"]
        if config["cache"] not in caches or config["model"] not in models:
            continue
        model = load_svm(models[config["model"]], device)
        if args.precision != "fp32" and model.head is None:
            continue  # the option applies to fc layers only
        recorded = config.get("settings", config)  # folders made before the flat manifests nest the settings
        settings = dataclasses.replace(settings_from_config(DetectSettings, recorded), precision=args.precision)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_detect(caches[config["cache"]], models[config["model"]], tmp, settings, device=device, model=model)
            stored = sorted(det.glob("*.npz"))
            differ = [p.name for p in stored if not _same(p, Path(tmp) / p.name)]
            entry = {"images": len(stored), "differing_images": differ, "identical": not differ,
                     "seconds": time.perf_counter() - start, "fc_s_per_image": summary.timings["fc"] / summary.done}
            if args.precision != "fp32":
                images = [test_images[p.stem] for p in stored]
                entry["map_stored"], entry["map_now"] = _map(det, images), _map(Path(tmp), images)
        result["folders"][det.name] = entry
        print(f"{det.name}: {len(stored)} images, {'identical' if not differ else f'{len(differ)} differ'}"
              + (f", mAP {entry['map_stored']:.4f} -> {entry['map_now']:.4f}" if "map_now" in entry else ""), flush=True)
    result["all_identical"] = all(f["identical"] for f in result["folders"].values())
    if args.precision != "fp32":
        changes = [f["map_now"] - f["map_stored"] for f in result["folders"].values()]
        result["map_change_max_abs"] = max(abs(c) for c in changes)
        result["map_change_mean"] = sum(changes) / len(changes)
        print(f"mAP change: mean {result['map_change_mean']:+.4f}, largest {result['map_change_max_abs']:.4f}")
    print(f"all identical: {result['all_identical']}")
    write_json(args.json, result)


def _smoke_work(work: Path, device: torch.device) -> None:
    """A work folder as ``bench.detection`` leaves one, tiny: caches of 2 trainval and 2 test
    images (a grid of 30 windows each, 1 scale), SVMs on pooled features, their detections, on ``device``."""
    from spp_detect.extract import ExtractSettings, run_extract
    from svm.train import SVMSettings, run_train_svm

    settings = ExtractSettings(weights=str(SQUEEZENET_FILE), scales=(240,))
    for split in ("trainval", "test"):
        images = read_voc(VOC_ROOT, split)[:2]
        grid = {im.image_id: _grid(im.width, im.height) for im in images}
        windows = proposals_file(work / f"proposals-{split}-grid30.mat", grid)
        run_extract(images, windows, work / f"feat-{split}", settings, image_set=split, device=device)
    run_train_svm([work / "feat-trainval"], work / "svm-pool", SVMSettings(layer="pool", C=0.1), device=device)
    run_detect(work / "feat-test", work / "svm-pool", work / "dets-pool", DetectSettings(), device=device)


def _grid(width: int, height: int) -> np.ndarray:
    """``np.ndarray[30, 4]`` float32 0-based xyxy: 5 x 3 cells of the image, and 5 x 3 of its centre half."""
    boxes = []
    for scale in (1.0, 0.5):
        w, h = width * scale, height * scale
        x0, y0 = (width - w) / 2, (height - h) / 2
        for i in range(5):
            for j in range(3):
                boxes.append([x0 + i * w / 5, y0 + j * h / 3, x0 + (i + 1) * w / 5 - 1, y0 + (j + 1) * h / 3 - 1])
    return np.asarray(boxes, dtype=np.float32)


def _map(folder: Path, images) -> float:
    dets = load_detections(folder, VOC_CLASSES)
    return evaluate_voc(dets, images).map


def _same(a: Path, b: Path) -> bool:
    with np.load(a) as x, np.load(b) as y:
        return all(np.array_equal(x[k], y[k]) for k in ("boxes", "scores", "labels"))


if __name__ == "__main__":
    main()
