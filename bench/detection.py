"""Benchmark: the detector's accuracy, shaped like the paper's Table 6 (SPP-net 4.3).

What it measures, and on what:

* **SPP columns** ``1-scale`` (scale 688, paper 4.1) and ``5-scale`` (480 .. 1200): train on
  all 900 training images on disk (``voc2007-mini`` trainval + ``voc2007-trainval-plus``
  trainval, two caches given together as ``--cache A --cache B`` would be) and test on all
  200 ``voc2007-mini`` test images, scoring **every** proposal window of every image
  (default proposals: the paper's fast mode, best ranked first, at most 2,000 per image).
* **Like-for-like columns** ``rcnn-style`` / ``1-scale-same-windows`` / ``5-scale-same-windows``: R-CNN's crop-warp
  features cost one trunk pass per window (~15-19 ms here), too slow for every window, so
  all three use the same reduced setting: the first ``--pair-windows`` proposals of each
  image (best first), the first ``--pair-train`` training and ``--pair-test`` test images,
  the same head recipe (:data:`PAIR_RECIPE`) and SVM recipe. The setting is stated in the
  JSON (``pair_setting``).
* Rows ``pool`` (SVMs on the pooled vector), ``ftfc6`` / ``ftfc7`` (SVMs on the fine-tuned
  head's layers), ``ftfc7 bb`` (fc7 plus box regression), per column.
* **Ablation** (``ablation`` in the JSON): recipe choices measured on a validation split
  of the training images, never on test: train on ``voc2007-trainval-plus`` (700 images),
  validate on ``voc2007-mini`` trainval (200 images), 1 scale, ``ftfc7`` row unless the
  variant is an SVM one (``pool`` row). The chosen recipe (:data:`RECIPE`) is what the
  columns above train with.

The SVM cost is ``train-svm``'s ``--C auto`` (0.001 x 5,011 / training images). Each stage
folder lives under ``--work`` and is keyed, so a rerun reuses finished stages; stage times
are recorded when a stage actually ran (``null`` when it was reused), and train-svm's peak
resident memory is sampled from ``/proc`` while it runs. ``--merge`` adds this run's
cells to an earlier JSON, so the table can be filled in several runs.

    python -m bench.detection [--json bench/results/detection.json]      # the whole run
    python -m bench.detection --columns 1-scale --no-pair --ablation ""   # one column
    python -m bench.detection --smoke                                     # seconds, for CI
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.common import SHARED_DATA, WEIGHTS, add_device_option, machine, write_json
from eval.voc import evaluate_voc
from proposals.run import ProposalSettings, run_proposals
from spp_detect.datasets.voc import VOC_CLASSES, read_voc
from spp_detect.detect import DetectSettings, load_detections, run_detect
from spp_detect.conv_finetune import with_trunk_of
from spp_detect.device import resolve_device
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.finetune import FinetuneSettings, run_finetune
from spp_detect.stage_dir import read_manifest
from spp_detect.windows import PAPER_SCALES
from svm.train import SVMSettings, run_train_svm

#: column -> (extract mode, scales)
COLUMNS = {"1-scale": ("spp", (688,)), "5-scale": ("spp", PAPER_SCALES)}
#: The like-for-like columns on the same first-K windows: R-CNN's crop-warp, SPP at 1 scale and at
#: the paper's 5 scales (Table 6 compares R-CNN with SPP at 5 scales on the same windows: 58.5 vs 59.2).
PAIR_COLUMNS = {"rcnn-style": ("crop-warp", (224,)), "1-scale-same-windows": ("spp", (688,)),
                "5-scale-same-windows": ("spp", PAPER_SCALES)}
#: row -> (SVM feature layer, box regression)
ROWS = {"pool": ("pool", False), "pool bb": ("pool", True), "ftfc6": ("fc6", False), "ftfc7": ("fc7", False),
        "ftfc7 bb": ("fc7", True), "ftconv fc7": ("fc7", False), "ftconv fc7 bb": ("fc7", True)}
#: Rows whose head trains the trunk through SPP too (CONV_RECIPE, the 1-scale column only): their
#: SVMs train on caches extracted with that head's fine-tuned trunk.
CONV_ROWS = ("ftconv fc7 bb", "ftconv fc7")
#: The order rows are trained in: the fc rows first (fast SVMs on 1,024-d features; ftfc7 and
#: ftfc7 bb share their SVMs), the pool row (25,600-d SVMs) last.
ROW_ORDER = ("ftfc7 bb", "ftfc7", "ftfc6", "pool")
CONV_COLUMN = "1-scale"
#: (dataset folder under ../shared/data, image set)
TRAIN_SETS = (("voc2007-mini", "trainval"), ("voc2007-trainval-plus", "trainval"))
TEST_SET = ("voc2007-mini", "test")
ABLATION_TRAIN, ABLATION_VAL = ("voc2007-trainval-plus", "trainval"), ("voc2007-mini", "trainval")
BACKBONE = "squeezenet1_0"


@dataclass(frozen=True)
class Recipe:
    """How the head is fine-tuned: its settings, and whether the mirrored training images
    (``extract --flip`` caches) are given to ``finetune`` beside the plain ones (the
    release does, docs/sources.md 1.6; its SVMs train on the plain images only, as here)."""

    finetune: FinetuneSettings
    flip: bool = False


#: The recipe the columns train with, chosen on the validation split (the ``ablation``
#: section of ``bench/results/detection.json`` shows each choice's effect).
RECIPE = Recipe(FinetuneSettings(fc_dim=1024, iterations=1500, base_lr=0.02, lr_steps=(1125,)), flip=True)
_BASE = Recipe(RECIPE.finetune, flip=False)
#: The trunk-training recipe of the ``ftconv`` rows (beyond the paper: Fast R-CNN 2.3 and 4.5):
#: fc6-fc8 start from the RECIPE head, then the trunk from SqueezeNet's fire5 on (the first
#: layers stay frozen, as Fast R-CNN keeps conv1-2) trains with them, 2 images x 64 windows per
#: minibatch, each image at 576 or 688 (cheaper than 688 alone; Fast R-CNN trained at 600),
#: flipped images included; learning rate 0.002 (the RECIPE head's last), divided by 10 at 80%.
CONV_RECIPE = Recipe(FinetuneSettings(fc_dim=1024, iterations=1500, base_lr=0.002, lr_steps=(1200,), train_from="fire5",
                                      images_per_batch=2, train_scales=(576, 688)), flip=True)
#: The pair's recipe, the same for both of its columns: R-CNN-style features cost one trunk
#: pass per window, so the pair trains on fewer images, without flips, for fewer iterations.
PAIR_RECIPE = Recipe(replace(RECIPE.finetune, iterations=500, lr_steps=(375,)), flip=False)
#: Ablation variants: name -> (recipe, SVM C factor over --C auto, row).
ABLATION = {
    "no flip": (_BASE, 1.0, "ftfc7"),
    "flipped images": (replace(_BASE, flip=True), 1.0, "ftfc7"),
    "flipped images + 3000 iterations": (
        replace(_BASE, flip=True, finetune=replace(_BASE.finetune, iterations=3000, lr_steps=(2250,))), 1.0, "ftfc7"),
    "pool C auto": (_BASE, 1.0, "pool"),
    "pool C auto x 4": (_BASE, 4.0, "pool"),
}


@contextmanager
def peak_rss(record: dict[str, float]):
    """Samples this process's resident memory (``/proc/self/status`` VmRSS) every 0.1 s
    while the block runs; ``record["peak_mb"]`` is the largest value seen, in MB."""
    stop = threading.Event()
    peak = [0.0]

    def sample() -> None:
        while True:
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        peak[0] = max(peak[0], int(line.split()[1]) / 1024)
            except OSError:
                return
            if stop.wait(0.1):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        stop.set()
        thread.join()
        record["peak_mb"] = peak[0]


class Bench:
    """The stages of one benchmark run, every folder under ``work`` and keyed."""

    def __init__(self, work: Path, device: torch.device, limit: int | None, workers: int,
                 json_path: Path | None = None, extract_precision: str = "fp32", fc_precision: str = "fp32") -> None:
        """``extract_precision``: the trunk's arithmetic (``extract --precision``);
        ``fc_precision``: the head's in train-svm and detect (their ``--precision``; rows on
        pooled features have no head). Folders of other precisions carry them in their name."""
        self.work, self.device, self.limit, self.workers = work, device, limit, workers
        self.extract_precision, self.fc_precision = extract_precision, fc_precision
        self.extract_tag = "" if extract_precision == "fp32" else f"-x{extract_precision}"
        self.fc_tag = "" if fc_precision == "fp32" else f"-fc{fc_precision}"
        self.json_path = json_path
        self.times: dict[str, float | None] = {}
        self.seconds_per_iteration: dict[str, float | None] = {}  # finetune folder -> this run's mean

    def checkpoint(self, result: dict) -> None:
        """Write the JSON so far (a long run keeps what it measured if it is stopped)."""
        result["map"] = {row: {c: cells[row]["map"] for c, cells in result["columns"].items() if row in cells} for row in ROWS
                         if any(row in cells for cells in result["columns"].values())}
        result["stage_seconds"].update(self.times)
        write_json(self.json_path, result)

    def images(self, dataset: str, image_set: str, limit: int | None = None):
        limit = min(x for x in (limit, self.limit, 10**9) if x is not None)
        return read_voc(SHARED_DATA / dataset, image_set, limit=limit)

    def proposals(self, dataset: str, image_set: str, images) -> Path:
        """The proposals folder of ``images``: default selective search (one folder per
        dataset list, computed once)."""
        folder = self.work / f"proposals-{dataset}-{image_set}"
        t0 = time.perf_counter()
        summary = run_proposals(images, folder, ProposalSettings(), {"dataset": dataset, "image_set": image_set},
                                workers=self.workers)
        if summary.done:
            self.times[f"proposals {dataset} {image_set}"] = time.perf_counter() - t0
        return folder

    def cache(self, column: str, mode: str, scales, dataset: str, image_set: str, limit: int | None = None,
              windows: int | None = None, flip: bool = False, backbone: str = BACKBONE, trunk_of: Path | None = None) -> Path:
        """The extract cache of ``dataset``/``image_set`` for ``column`` (a column of another
        ``backbone`` than :data:`BACKBONE` must have a name of its own); ``trunk_of``: a head
        folder whose fine-tuned trunk computes the maps (``extract --head``)."""
        images = self.images(dataset, image_set, limit)
        props = self.proposals(dataset, image_set, images)
        settings = ExtractSettings(backbone=backbone, weights=str(WEIGHTS[backbone]), scales=tuple(scales), mode=mode,
                                   flip=flip, max_proposals=windows, precision=self.extract_precision)
        if trunk_of is not None:
            settings = with_trunk_of(settings, trunk_of)
        name = (f"feat-{column}-{dataset}-{image_set}-{len(images)}" + (f"-w{windows}" if windows else "")
                + ("-flip" if flip else "") + (f"-trunk-{trunk_of.name}" if trunk_of is not None else "") + self.extract_tag)
        folder = self.work / name
        t0 = time.perf_counter()
        summary = run_extract(images, props, folder, settings, image_set=image_set, device=self.device)
        self.times[f"extract {name}"] = (time.perf_counter() - t0) / summary.done if summary.done else None
        return folder

    def head(self, caches: list[Path], recipe: Recipe, tag: str, flipped: list[Path] | None = None) -> Path:
        """Fine-tune on ``caches`` (and on ``flipped``, their mirrored twins, if the recipe flips)."""
        folder = self.work / f"head-{tag}-{_short(recipe.finetune)}{'-flip' if recipe.flip else ''}"
        t0 = time.perf_counter()
        summary = run_finetune(caches + (flipped if recipe.flip else []), folder, recipe.finetune, device=self.device)
        self.times[f"finetune {folder.name}"] = None if summary.already_done else time.perf_counter() - t0
        return folder

    def conv_head(self, caches: list[Path], flipped: list[Path], recipe: Recipe, init: Path, tag: str) -> Path:
        """Train the trunk with fc6-fc8 (``finetune --train-from``), fc layers from ``init``."""
        # a short name (the recipe and the head it starts from, hashed): cache and detection folders carry it
        digest = hashlib.sha256(json.dumps([asdict(recipe.finetune), recipe.flip, init.name]).encode()).hexdigest()[:10]
        folder = self.work / f"headconv-{tag}-{recipe.finetune.train_from}-{recipe.finetune.iterations}-{digest}"
        t0 = time.perf_counter()
        summary = run_finetune(caches + (flipped if recipe.flip else []), folder, recipe.finetune, device=self.device,
                               weights=WEIGHTS[BACKBONE], init_head=init)
        self.times[f"finetune {folder.name}"] = None if summary.already_done else time.perf_counter() - t0
        self.seconds_per_iteration[folder.name] = summary.seconds_per_iteration
        return folder

    def row(self, caches: list[Path], head: Path | None, test_cache: Path, test_images, row: str, tag: str,
            C_factor: float = 1.0) -> dict[str, object]:
        """Train the SVMs of ``row`` on ``caches``, detect on ``test_cache``, evaluate."""
        layer, bbox = ROWS[row]
        C = SVMSettings().C  # "auto"
        if C_factor != 1.0:
            C = _auto_C(caches) * C_factor
        # fc7 SVMs are trained once, with box regressors: rows ftfc7 and ftfc7 bb differ only in
        # whether detect applies them (the SVMs do not depend on it)
        precision = self.fc_precision if layer != "pool" else "fp32"
        svm_settings = SVMSettings(layer=layer, bbox=layer == "fc7" or bbox, C=C, precision=precision)
        head_tag = head.name if head is not None and layer != "pool" else "nohead"
        svm_dir = self.work / f"svm-{tag}-{layer}{'-bb' if svm_settings.bbox else ''}-C{C_factor:g}-{head_tag}{self.fc_tag if layer != 'pool' else ''}"
        record: dict[str, object] = {}
        t0 = time.perf_counter()
        with peak_rss(record):
            summary = run_train_svm(caches, svm_dir, svm_settings, head_folder=None if layer == "pool" else head,
                                    device=self.device)
        train_s = None if summary.already_done else time.perf_counter() - t0
        det_dir = self.work / (f"dets-{tag}-{row.replace(' ', '')}-C{C_factor:g}-{head_tag}-{test_cache.name}"
                               + (self.fc_tag if layer != "pool" else ""))
        t0 = time.perf_counter()
        det = run_detect(test_cache, svm_dir, det_dir, DetectSettings(bbox=bbox, precision=precision), device=self.device)
        detect_s = (time.perf_counter() - t0) / det.done if det.done else None
        evaluation = evaluate_folder(det_dir, test_images)
        return {
            "map": evaluation.map,
            "per_class_ap": dict(evaluation.ap),
            "svm_folder": svm_dir.name,
            "detections_folder": det_dir.name,
            "train_svm_seconds": train_s,
            "train_svm_peak_mb": record["peak_mb"] if train_s is not None else None,
            "detect_seconds_per_image": detect_s,
            "svm_C": read_manifest(svm_dir).get("config", {}).get("resolved_C", C),
            "svm_tol": read_manifest(svm_dir).get("config", {}).get("tol"),
        }


def evaluate_folder(folder: Path, images):
    """VOC07 AP of a detections folder (detect or combine) on ``images``."""
    return evaluate_voc(load_detections(folder, VOC_CLASSES), images)


def _auto_C(caches: list[Path]) -> float:
    """What ``train-svm --C auto`` resolves to on ``caches`` (:meth:`svm.train.SVMSettings.resolved_c`)."""
    from spp_detect.cache import FeatureCache

    return SVMSettings().resolved_c(sum(len(FeatureCache(c).image_ids) for c in caches))


def _short(recipe: FinetuneSettings) -> str:
    """A readable folder tag of the settings that differ from :class:`FinetuneSettings`' defaults."""
    base = asdict(FinetuneSettings())
    diff = {k: v for k, v in asdict(recipe).items() if base[k] != v}
    return "-".join(f"{k}{'x'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in sorted(diff.items())) or "defaults"


def _train_caches(bench: Bench, column: str, mode: str, scales, sets, recipe: Recipe, **kw) -> tuple[list[Path], list[Path]]:
    """The plain training caches of ``sets`` and, if the recipe flips, their mirrored twins."""
    plain = [bench.cache(column, mode, scales, *s, **kw) for s in sets]
    flipped = [bench.cache(column, mode, scales, *s, flip=True, **kw) for s in sets] if recipe.flip else []
    return plain, flipped


def _column(bench: Bench, name: str, mode: str, scales, train_sets, test_set, recipe: Recipe, result: dict,
            train_limit: int | None = None, test_limit: int | None = None, windows: int | None = None,
            rows=tuple(ROWS)) -> None:
    """One column of the table: train every row on ``train_sets``, test on ``test_set``."""
    test_images = bench.images(*test_set, limit=test_limit)
    train, flipped = _train_caches(bench, name, mode, scales, train_sets, recipe, limit=train_limit, windows=windows)
    test = bench.cache(name, mode, scales, *test_set, limit=test_limit, windows=windows)
    tag = name + (f"-{train_limit}-w{windows}" if windows else "")
    head = bench.head(train, recipe, tag, flipped)
    cells = result["columns"].setdefault(name, {})
    for row in (r for r in ROW_ORDER if r in rows):
        cells[row] = bench.row(train, head, test, test_images, row, tag)
        print(f"{name:>22} {row:>9}: mAP {100 * cells[row]['map']:5.1f}", flush=True)
        bench.checkpoint(result)
    if any(r in rows for r in CONV_ROWS):
        _conv_rows(bench, name, mode, scales, train_sets, test_set, head, train, flipped, test_limit, result,
                   [r for r in CONV_ROWS if r in rows])
    result["train_images"][name] = sum(len(bench.images(*s, limit=train_limit)) for s in train_sets)
    result["test_images"][name] = len(test_images)
    result["windows_per_image"][name] = windows if windows else "all (up to 2,000)"


def _conv_rows(bench: Bench, name: str, mode: str, scales, train_sets, test_set, head: Path,
               train: list[Path], flipped: list[Path], test_limit, result: dict, rows: list[str]) -> None:
    """The ``ftconv`` rows: the trunk trained with the head (CONV_RECIPE, from ``head``), then
    caches of every training and test image extracted with it, SVMs and detection on those."""
    if not CONV_RECIPE.flip:
        flipped = []
    else:
        flipped = flipped or [bench.cache(name, mode, scales, *s, flip=True) for s in train_sets]
    conv = bench.conv_head(train, flipped, CONV_RECIPE, head, name)
    test_images = bench.images(*test_set, limit=test_limit)
    train_ft = [bench.cache(name, mode, scales, *s, trunk_of=conv) for s in train_sets]
    test_ft = bench.cache(name, mode, scales, *test_set, limit=test_limit, trunk_of=conv)
    cells = result["columns"].setdefault(name, {})
    for row in rows:
        cells[row] = bench.row(train_ft, conv, test_ft, test_images, row, name)
        print(f"{name:>22} {row:>9}: mAP {100 * cells[row]['map']:5.1f}", flush=True)
        bench.checkpoint(result)
    log = json.loads((conv / "train_log.json").read_text())
    per_iteration = bench.seconds_per_iteration.get(conv.name)
    earlier = result.get("ftconv", {})
    if per_iteration is None and earlier.get("head") == conv.name:  # trained by an earlier run: keep its figure
        per_iteration = earlier.get("seconds_per_iteration")
    result["ftconv"] = {
        "recipe": asdict(CONV_RECIPE.finetune), "flip": CONV_RECIPE.flip, "init_head": head.name, "head": conv.name,
        "seconds_per_iteration": per_iteration,
        "finetune_seconds": per_iteration * CONV_RECIPE.finetune.iterations if per_iteration else None,
        "last_round": log[-1] if log else None,
    }


def run_columns(bench: Bench, columns: list[str], result: dict, rows=tuple(ROWS)) -> None:
    for column in columns:
        mode, scales = COLUMNS[column]
        column_rows = rows if column == CONV_COLUMN else tuple(r for r in rows if r not in CONV_ROWS)
        _column(bench, column, mode, scales, TRAIN_SETS, TEST_SET, RECIPE, result, rows=column_rows)


def run_pair(bench: Bench, args, result: dict) -> None:
    for column, (mode, scales) in PAIR_COLUMNS.items():
        if column not in args.pair_columns.split(","):
            continue
        _column(bench, column, mode, scales, TRAIN_SETS[:1], TEST_SET, PAIR_RECIPE, result, train_limit=args.pair_train,
                test_limit=args.pair_test, windows=args.pair_windows, rows=tuple(r for r in ROWS if r not in CONV_ROWS))
    result["pair_setting"] = (
        f"first {args.pair_windows} proposals (best first) of the first {args.pair_train} images of "
        f"{'/'.join(TRAIN_SETS[0])} (training) and the first {result['test_images']['rcnn-style']} of "
        f"{'/'.join(TEST_SET)} (test); every column: the same head recipe ({PAIR_RECIPE.finetune.iterations} "
        f"iterations, fc {PAIR_RECIPE.finetune.fc_dim}, no flips) and SVM recipe (C auto)"
    )


def run_ablation(bench: Bench, names: list[str], result: dict) -> None:
    val_images = bench.images(*ABLATION_VAL)
    val = bench.cache("1-scale", "spp", (688,), *ABLATION_VAL)
    for name in names:
        recipe, C_factor, row = ABLATION[name]
        train, flipped = _train_caches(bench, "1-scale", "spp", (688,), (ABLATION_TRAIN,), recipe)
        head = bench.head(train, recipe, "ablation", flipped) if row != "pool" else None
        cell = bench.row(train, head, val, val_images, row, "ablation", C_factor=C_factor)
        result["ablation"][name] = {"row": row, "finetune": asdict(recipe.finetune) if row != "pool" else None,
                                    "flip": recipe.flip if row != "pool" else None, "C_factor": C_factor, **cell}
        print(f"{'ablation':>22} {name:>34} ({row}): val mAP {100 * cell['map']:5.1f}", flush=True)
        bench.checkpoint(result)
    result["ablation_setting"] = (
        f"train on {'/'.join(ABLATION_TRAIN)} ({len(bench.images(*ABLATION_TRAIN))} images), validate on "
        f"{'/'.join(ABLATION_VAL)} ({len(val_images)} images), 1 scale, every window"
    )


def main() -> None:
    global RECIPE, PAIR_RECIPE, CONV_RECIPE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--columns", default=",".join(COLUMNS), help="SPP columns to run (comma-separated, or empty)")
    parser.add_argument("--rows", default=",".join(ROWS), help="rows of the SPP columns to run (comma-separated)")
    parser.add_argument("--pair", action=argparse.BooleanOptionalAction, default=True, help="the rcnn-style pair")
    parser.add_argument("--pair-columns", default=",".join(PAIR_COLUMNS), help="columns of the pair to run (comma-separated)")
    parser.add_argument("--pair-windows", type=int, default=100)
    parser.add_argument("--pair-train", type=int, default=100)
    # all 200 test images: on 50, per-class APs rest on one or two objects and swing by tens of points
    # between the two columns (measured: rcnn-style minus 1-scale-same-windows from -31 to +73 per class)
    parser.add_argument("--pair-test", type=int, default=200)
    parser.add_argument("--ablation", default=",".join(ABLATION), help="ablation variants (comma-separated, or empty)")
    parser.add_argument("--smoke", action="store_true", help="2 images per list, 1-scale column, pair on 10 windows, one variant: every code path in a minute")
    add_device_option(parser)
    parser.add_argument("--workers", type=int, default=2, help="proposal processes")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-detection"))
    parser.add_argument("--merge", type=Path, default=None,
                        help="a JSON of an earlier run whose columns / ablation entries this run adds to")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    limit = None
    if args.smoke:
        limit, args.columns = 2, "1-scale"
        args.pair_windows, args.pair_train, args.pair_test = 10, 2, 1
        if args.pair_columns == parser.get_default("pair_columns"):  # 1-scale-same-windows: the 1-scale column's path
            args.pair_columns = "rcnn-style,5-scale-same-windows"
        RECIPE = Recipe(replace(RECIPE.finetune, fc_dim=64, iterations=20, lr_steps=(15,), round_iterations=10), flip=True)
        PAIR_RECIPE = replace(RECIPE, flip=False)
        CONV_RECIPE = Recipe(replace(CONV_RECIPE.finetune, fc_dim=64, iterations=4, lr_steps=(3,), round_iterations=2,
                                     train_scales=(288,)), flip=True)
        ABLATION.clear()
        ABLATION["smoke recipe"] = (RECIPE, 1.0, "ftfc7")
        args.ablation = "smoke recipe"
        if args.work == parser.get_default("work"):
            args.work = Path(tempfile.mkdtemp(prefix="bench-detection-smoke-"))
    device = resolve_device(args.device)
    bench = Bench(args.work, device, limit, args.workers, args.json)
    result: dict = json.loads(args.merge.read_text()) if args.merge else {}
    result.update({"machine": machine(), "device": str(device), "device_given": args.device, "backbone": BACKBONE,
                   "recipe": {"finetune": asdict(RECIPE.finetune), "flip": RECIPE.flip},
                   "pair_recipe": {"finetune": asdict(PAIR_RECIPE.finetune), "flip": PAIR_RECIPE.flip},
                   "conv_recipe": {"finetune": asdict(CONV_RECIPE.finetune), "flip": CONV_RECIPE.flip},
                   "proposals": asdict(ProposalSettings()), "smoke": args.smoke})
    for key in ("columns", "ablation", "train_images", "test_images", "windows_per_image", "stage_seconds"):
        result.setdefault(key, {})
    start = time.perf_counter()
    if args.ablation:
        run_ablation(bench, args.ablation.split(","), result)
    if args.columns:
        run_columns(bench, args.columns.split(","), result, tuple(args.rows.split(",")))
    if args.pair:
        run_pair(bench, args, result)
    result["wall_seconds"] = result.get("wall_seconds", 0.0) + time.perf_counter() - start
    bench.checkpoint(result)  # the table, the stage times and the JSON
    _print_table(result)


def _print_table(result: dict) -> None:
    columns = list(result["columns"])
    print("\nmAP (VOC07 11-point, %), SqueezeNet; columns: train / test images, windows per image")
    for c in columns:
        print(f"  {c}: {result['train_images'][c]} / {result['test_images'][c]}, {result['windows_per_image'][c]}")
    print(f"{'':>14} " + " ".join(f"{c:>21}" for c in columns))
    for row in result["map"]:
        print(f"{row:>14} " + " ".join(f"{100 * result['map'][row].get(c, float('nan')):>21.1f}" for c in columns))
    if result["ablation"]:
        print(f"\nablation ({result['ablation_setting']}):")
        for name, cell in result["ablation"].items():
            print(f"  {name:>34} ({cell['row']}): {100 * cell['map']:5.1f}")
    print(f"\nwall: {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
