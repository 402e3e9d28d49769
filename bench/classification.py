"""SPP-net image classification on VOC2007 image labels (paper Tables 3 and 2, small scale).

Data: ../shared/data/voc2007-mini (train on its 200 trainval images, test on its 200 test
images; the full-view size is chosen on its train/val split, never on test).

Part 1, Table 3 (for every backbone whose weights are on disk): whole-image features of
the frozen ImageNet trunk, one linear SVM per class (L2-normalised, C = 1, paper 3.2),
devkit classification mAP (VOCevalcls.m, 11 points). Columns:

* ``plain-crop224``: centre 224 crop, a plain net's fixed 3x3/2 pool5 (6 x 6 on SqueezeNet's
  13 x 13 map); the plain net has no pyramid, so its ``pyramid`` cell is ``null``;
* ``crop224``: centre 224 crop, SPP; ``full224``: full image, shorter side 224, SPP;
* ``full-best``: full image at the size ``s`` of ``--sizes`` with the best mAP on val
  (SVMs trained on train, scored on val), then trained on trainval and scored on test.

Rows: ``level6`` (the 6 x 6 level alone, the paper's "pool5") and ``pyramid`` (levels 1, 2, 3,
6). Both come from one pass: level 6 is the last ``C * 36`` numbers of the pyramid vector.

Part 2, Table 2's structure (``--trained-backbone``): the SPP classifier trained end to end
on trainval (fire9 + head; :mod:`spp_detect.classification.train`) at one size (224) or two
(224 / 180 by epoch), tested on the centre-224 crop and on the full image (shorter side 256).

JSON: ``map[<row>][<column>]`` for the first backbone (SqueezeNet), ``backbones[<name>]`` the
same per backbone, ``best_size`` / ``val_map`` for the sweep, ``trained[<sizes>][<view>]``
(sizes ``"224"``, ``"224,180"``; views ``crop``, ``full``), plus times.

Usage: ``python -m bench.classification [--epochs 10] [--json bench/results/classification.json]``
(~15 min on this project's 2 shared CPU cores, one torch thread).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import SHARED_DATA, VOC_ROOT, add_device_option, machine, print_table, smoke_args, write_json
from eval.voc_cls import evaluate_voc_cls, voc_cls_ground_truth
from spp_detect.backbones import build_trunk, get_backbone, resolve_normalization
from spp_detect.classification.features import FeatureSettings, image_features
from spp_detect.classification.svm import train_svms
from spp_detect.classification.train import TrainSettings, predict, run_training
from spp_detect.datasets.voc import VOC_CLASSES, read_voc
from spp_detect.device import resolve_device
from spp_detect.image_trunk import load_image_rgb, prepare_trunk

WEIGHTS = {
    "squeezenet1_0": SHARED_DATA / "weights" / "squeezenet1_0-imagenet-deepcompression.pth",
    "mobilenet_v2": SHARED_DATA / "weights" / "mobilenet_v2-imagenet1001-coral.pth",
}
COLUMNS = ("plain-crop224", "crop224", "full224", "full-best")
ROWS = ("level6", "pyramid")


def features(trunk, norm, pixels, settings: FeatureSettings, device: torch.device) -> np.ndarray:
    rows = dict(image_features(trunk, norm, pixels, settings, device))
    return np.stack([rows[i] for i in range(len(pixels))])


def covering(images, per_class: int | None):
    """The first ``per_class`` images holding a non-difficult object of each class (their
    union, in list order), so that every class has positives; all if None."""
    if per_class is None:
        return images
    counts = np.zeros(len(VOC_CLASSES), dtype=np.int64)
    chosen = []
    for image in images:
        present = np.unique(np.asarray(image.labels, dtype=np.int64)[~np.asarray(image.difficult, dtype=bool)])
        if (counts[present] < per_class).any():
            counts[present] += 1
            chosen.append(image)
    return chosen


def svm_map(train_x, train_y, test_x, test_images, classes=None) -> float:
    """mAP on ``test_images`` of SVMs trained on (train_x, train_y); ``classes``: column subset."""
    keep = list(range(len(VOC_CLASSES))) if classes is None else classes
    names = tuple(VOC_CLASSES[k] for k in keep)
    classifier = train_svms(train_x, train_y[:, keep], names)
    return evaluate_voc_cls(classifier.scores(test_x), test_images, classes=names).map


def level6(x: np.ndarray, channels: int) -> np.ndarray:
    return x[:, -channels * 36 :]  # levels (1, 2, 3, 6) are laid out level by level


def table3(name: str, data: dict, sizes: list[int], device: torch.device) -> dict[str, object]:
    weights = WEIGHTS[name]
    spec = get_backbone(name)
    trunk = prepare_trunk(build_trunk(name, weights), device)
    norm = resolve_normalization(name, weights)
    rows = {"trainval": data["trainval"], "test": data["test"]}
    y_trainval, y_train = data["y_trainval"], data["y_trainval"][data["train_rows"]]
    out: dict[str, dict[str, float | None]] = {row: {} for row in ROWS}
    times: dict[str, float] = {}

    def cell_pair(settings: FeatureSettings) -> tuple[dict[str, np.ndarray], float]:
        start = time.perf_counter()
        x = {split: features(trunk, norm, pixels, settings, device) for split, pixels in rows.items()}
        return x, time.perf_counter() - start

    x, times["plain-crop224"] = cell_pair(FeatureSettings(name, str(weights), view="crop", size=224, pooling="plain"))
    out["level6"]["plain-crop224"] = svm_map(x["trainval"], y_trainval, x["test"], data["test_images"])
    out["pyramid"]["plain-crop224"] = None  # a plain net has no pyramid (paper Table 4: "-")
    feats = {}
    for column, view, size in (("crop224", "crop", 224), ("full224", "full", 224)):
        feats[column], times[column] = cell_pair(FeatureSettings(name, str(weights), view=view, size=size))
    # Scale sweep on val (train on train), per row; then the chosen size on test.
    val_map: dict[str, dict[int, float]] = {row: {} for row in ROWS}
    sweep = {}
    val_classes = data["val_classes"]
    for size in sizes:
        if size == 224:
            sweep[size] = feats["full224"]
        else:
            sweep[size], times[f"full{size}"] = cell_pair(FeatureSettings(name, str(weights), view="full", size=size))
        tv = sweep[size]["trainval"]
        for row in ROWS:
            pick = (lambda a: level6(a, spec.channels)) if row == "level6" else (lambda a: a)
            val_map[row][size] = svm_map(pick(tv[data["train_rows"]]), y_train, pick(tv[data["val_rows"]]),
                                         data["val_images"], val_classes)
    best = {row: max(sizes, key=lambda s: val_map[row][s]) for row in ROWS}
    feats["full-best"] = None
    for row in ROWS:
        pick = (lambda a: level6(a, spec.channels)) if row == "level6" else (lambda a: a)
        for column in ("crop224", "full224", "full-best"):
            x = sweep[best[row]] if column == "full-best" else feats[column]
            out[row][column] = svm_map(pick(x["trainval"]), y_trainval, pick(x["test"]), data["test_images"])
    return {"map": out, "best_size": best, "val_map": val_map, "feature_seconds": times,
            "dims": {"level6": spec.channels * 36, "pyramid": spec.channels * 50}}


def trained(name: str, data: dict, epochs: int, lr: float, device: torch.device) -> tuple[dict, dict]:
    weights = WEIGHTS[name]
    norm = resolve_normalization(name, weights)
    results: dict[str, dict[str, float]] = {}
    info: dict[str, object] = {}
    import tempfile
    from pathlib import Path

    for sizes in ((224,), (224, 180)):
        key = ",".join(str(s) for s in sizes)
        settings = TrainSettings(name, str(weights), sizes=sizes, epochs=epochs, lr=lr)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            state = run_training(data["trainval"], data["y_trainval"], VOC_CLASSES, Path(folder), settings, norm, device)
        train_seconds = time.perf_counter() - start
        results[key] = {}
        for view in ("crop", "full"):
            scores = predict(state.model, norm, data["test"], view, device, size=settings.resize, crop=settings.crop)
            results[key][view] = evaluate_voc_cls(scores, data["test_images"]).map
        info[key] = {"losses": state.losses, "epoch_sizes": state.sizes, "train_seconds": train_seconds}
    return results, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="squeezenet1_0,mobilenet_v2")
    parser.add_argument("--sizes", default="224,288,352,392,448", help="Full-view sizes of the val sweep.")
    parser.add_argument("--trained-backbone", default="squeezenet1_0", help="'' skips part 2.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine 2 threads stall on each other)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="only the first N images of each class in every list (their union); default all")
    add_device_option(parser)
    parser.add_argument("--json", default=None)
    args = smoke_args(parser, backbones="squeezenet1_0", sizes="224", trained_backbone="", per_class=2)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    trainval_images, test_images = (covering(read_voc(VOC_ROOT, s), args.per_class) for s in ("trainval", "test"))
    position = {im.image_id: i for i, im in enumerate(trainval_images)}
    train_rows = [position[im.image_id] for im in read_voc(VOC_ROOT, "train") if im.image_id in position]
    val_rows = [position[im.image_id] for im in read_voc(VOC_ROOT, "val") if im.image_id in position]
    y_trainval = voc_cls_ground_truth(trainval_images)
    has = lambda rows: (y_trainval[rows] > 0).any(0)  # noqa: E731
    data = {
        "trainval": [load_image_rgb(im.path) for im in trainval_images],
        "test": [load_image_rgb(im.path) for im in test_images],
        "test_images": test_images,
        "val_images": [trainval_images[i] for i in val_rows],
        "y_trainval": y_trainval,
        "train_rows": train_rows,
        "val_rows": val_rows,
        # The sweep scores the classes with positives in both train and val.
        "val_classes": [k for k in range(len(VOC_CLASSES)) if has(train_rows)[k] and has(val_rows)[k]],
    }
    sizes = [int(s) for s in args.sizes.split(",")]
    backbones = [b for b in args.backbones.split(",") if b]
    payload: dict[str, object] = {"machine": machine(), "device": str(device), "device_given": args.device,
                                  "threads": args.threads, "sweep_sizes": sizes,
                                  "val_classes": [VOC_CLASSES[k] for k in data["val_classes"]], "backbones": {}}
    for name in backbones:
        t0 = time.perf_counter()
        result = table3(name, data, sizes, device)
        result["seconds"] = time.perf_counter() - t0
        payload["backbones"][name] = result
        table = [(f"{row:<8} {column}", "-" if value is None else f"{100 * value:.2f}")
                 for row, cells in result["map"].items() for column, value in cells.items()]
        table.append(("best full size (val)", str(result["best_size"])))
        print_table(table, f"{name}: VOC07 test mAP (%), linear SVMs on whole-image features ({result['seconds']:.0f} s)")
    payload["map"] = payload["backbones"][backbones[0]]["map"] if backbones else {}
    if args.trained_backbone:
        t0 = time.perf_counter()
        payload["trained"], payload["trained_info"] = trained(args.trained_backbone, data, args.epochs, args.lr, device)
        payload["trained_backbone"], payload["trained_epochs"] = args.trained_backbone, args.epochs
        payload["trained_seconds"] = time.perf_counter() - t0
        print_table([(f"{sizes_key:<8} {view}", f"{100 * v:.2f}") for sizes_key, views in payload["trained"].items()
                     for view, v in views.items()],
                    f"{args.trained_backbone} SPP classifier trained end to end, {args.epochs} epochs: VOC07 test mAP (%)")
    payload["seconds"] = time.perf_counter() - start
    print(f"\ntotal {payload['seconds']:.0f} s")
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
