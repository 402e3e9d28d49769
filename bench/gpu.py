"""Benchmark: one command that proves the GPU path on a lent GPU (issue 28, item 4).

Two steps, because the GPU machine has no ``../shared/data``:

1. here, on a machine with the data: ``python -m bench.gpu --prepare bench-gpu-data``
   copies the first ``--images`` (10) VOC2007 trainval JPEGs with their XML files into a
   small VOCdevkit folder, runs selective search on them (the paper's fast mode, on the
   CPU) and copies the SqueezeNet weights beside them (about 7 MB in all; keep the folder
   out of git: ``.git/info/exclude``);
2. there, with that folder carried: ``python -m bench.gpu --data bench-gpu-data --device
   cuda --json bench/results/gpu.json``. It installs nothing and downloads nothing.

What the run does, all on ``--device`` unless said otherwise:

* stages: ``extract`` at 1 scale (688) and at the paper's 5 scales, ``finetune`` (fc 1,024,
  200 iterations), ``train-svm`` (fc7, box regression), ``detect`` on the 1- and 5-scale
  caches, through the library calls the commands make, on up to ``--windows`` (2,000)
  selective-search windows per image; ``images_per_second`` of extract and detect;
* the share of each stage's time spent waiting on the CPU (``cpu_wait_share``): on CUDA,
  each stage is run again under ``torch.profiler`` tracing only the GPU's activity, and
  the share is 1 - (union of the GPU's kernel, copy and set intervals) / the stage's wall
  time. Beside it (and alone on the CPU), ``cpu_side_share`` from the stages' own timing
  summaries: for detect (``DetectSummary.timings``) map decode + NMS (with thresholds and
  box regression) + untimed over the total; for extract, 1 - the bare conv pass over the
  stage's time. finetune and train-svm keep no timing summary: on the CPU their share is
  null;
* CUDA against the CPU (``--reference``) on the first ``--compare-images`` (2) images,
  with TF32 on and off (``torch.backends.cuda.matmul`` / ``cudnn.conv`` ``fp32_precision``):
  the largest absolute differences of the conv maps, the pooled features (pooled from the
  fp16-rounded maps, as the cache holds them), fc7, the SVM scores (the same model, loaded
  on each device), and the detections of ``predict`` on the same windows (matched by class
  and IoU >= 0.99: the share matched, the largest score and box-coordinate differences);
* the issue's target: detect at 5 scales at least 50 images/s on one GPU (the paper: 0.38 s
  per image for conv + fc at 5 scales on a 2014 GPU, SPP-net ECCV Table 6: 0.293 s conv + 0.089 s fc; docs/sources.md 1.13).

A section that fails is recorded under ``errors`` (with its traceback's last lines) and
the rest still runs, so one lent-GPU run says as much as it can; the exit status is then 1.

``--smoke`` runs the same code on the CPU (``cpu:0`` standing in for ``cuda``, against
``cpu``: every difference must be 0) on 3 images, 100 windows, scales 240 and (240, 336),
with its data prepared from ../shared/data into a temporary folder.

    python -m bench.gpu --prepare DIR [--images 10]                 # on a machine with ../shared/data
    python -m bench.gpu --data DIR [--device cuda] [--json PATH]    # on the GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO_ROOT, SQUEEZENET_FILE, VOC_ROOT, add_device_option, machine, print_table, smoke_args, write_json
from proposals.io import load_proposals
from proposals.run import ProposalSettings, run_proposals
from spp_detect.backbones import NORMALIZATIONS, build_trunk, resolve_normalization
from spp_detect.boxes import box_iou
from spp_detect.cache import FeatureCache
from spp_detect.datasets import read_voc
from spp_detect.detect import DetectSettings, DetectSummary, run_detect
from spp_detect.device import resolve_device
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.finetune import FinetuneSettings, run_finetune
from spp_detect.image_trunk import conv_maps, load_image_rgb, prepare_trunk
from spp_detect.model import export_model, load_model
from spp_detect.spp import spatial_pyramid_pool
from spp_detect.stage_dir import file_sha256
from spp_detect.windows import PAPER_SCALES
from svm.train import SVMSettings, run_train_svm

BACKBONE = "squeezenet1_0"
IMAGE_SET = "bench"  # the image list of a prepared folder (VOC2007/ImageSets/Main/bench.txt)
PREPARED = "prepared.json"
#: the issue's target for detect at 5 scales on one GPU, images/s
TARGET_DETECT_5SCALE = 50.0
#: predict's detections on two devices are the same detection at IoU >= this (same class)
MATCH_IOU = 0.99
RUNS = ("extract_1scale", "extract_5scale", "finetune", "train_svm", "detect_1scale", "detect_5scale")


# --------------------------------------------------------------------------- the data folder
def prepare(out: Path, voc_root: Path, images: int, proposals: ProposalSettings, weights: Path, workers: int = 1) -> Path:
    """Write the data folder the GPU run reads: ``VOC2007/{JPEGImages,Annotations}`` with the
    first ``images`` trainval images of ``voc_root`` (byte copies) and the list
    ``ImageSets/Main/bench.txt``, ``proposals/`` (a proposals stage folder, computed here on
    the CPU), ``weights/<file>`` and ``prepared.json`` (ids, weights SHA-256, settings)."""
    out = Path(out)
    source = read_voc(voc_root, "trainval", limit=images)
    year = out / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (year / sub).mkdir(parents=True, exist_ok=True)
    for im in source:
        shutil.copyfile(im.path, year / "JPEGImages" / f"{im.image_id}.jpg")
        shutil.copyfile(Path(voc_root) / "VOC2007" / "Annotations" / f"{im.image_id}.xml",
                        year / "Annotations" / f"{im.image_id}.xml")
    (year / "ImageSets" / "Main" / f"{IMAGE_SET}.txt").write_text("".join(f"{im.image_id}\n" for im in source))
    copied = read_voc(out, IMAGE_SET)
    run_proposals(copied, out / "proposals", proposals, {"year": "2007", "image_set": IMAGE_SET}, workers=workers)
    (out / "weights").mkdir(exist_ok=True)
    shutil.copyfile(weights, out / "weights" / Path(weights).name)
    meta = {"images": [im.image_id for im in copied], "source": str(voc_root), "weights": Path(weights).name,
            "weights_sha256": file_sha256(Path(weights)), "backbone": BACKBONE,
            "proposals": {"mode": proposals.mode, "max_boxes": proposals.max_boxes, "max_pixels": proposals.max_pixels}}
    (out / PREPARED).write_text(json.dumps(meta, indent=2))
    _warn_if_tracked(out)
    return out


def _warn_if_tracked(folder: Path) -> None:
    """Say how to keep a data folder inside the checkout out of git (it is never committed)."""
    folder = folder.resolve()
    if REPO_ROOT not in folder.parents:
        return
    with contextlib.suppress(OSError):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(folder)], cwd=REPO_ROOT).returncode == 0
        if not ignored:
            print(f"note: {folder.relative_to(REPO_ROOT)} is not git-ignored; add '/{folder.relative_to(REPO_ROOT)}/' "
                  "to .git/info/exclude (not to .gitignore: the folder is yours, not the project's)")


def load_prepared(folder: Path, images: int, windows: int):
    """``(images, proposals, weights file)`` of a folder made by :func:`prepare`: its first
    ``images`` images, each with its first ``windows`` proposals (``np.ndarray[M, 4]``).

    Raises:
        ValueError: not such a folder, or its weights file changed since.
    """
    meta_path = Path(folder) / PREPARED
    if not meta_path.is_file():
        raise ValueError(f"{folder} is not a folder made by `python -m bench.gpu --prepare` ({PREPARED} missing)")
    meta = json.loads(meta_path.read_text())
    weights = Path(folder) / "weights" / meta["weights"]
    if file_sha256(weights) != meta["weights_sha256"]:
        raise ValueError(f"{weights} is not the weights file {folder} was prepared with (SHA-256 differs)")
    chosen = read_voc(folder, IMAGE_SET)[:images]
    proposals = load_proposals(Path(folder) / "proposals", [im.image_id for im in chosen])
    return chosen, {k: v[:windows] for k, v in proposals.items()}, weights


# --------------------------------------------------------------------------- timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def union_seconds(starts: np.ndarray, ends: np.ndarray) -> float:
    """Length of the union of the intervals ``[starts[i], ends[i])`` (``np.ndarray[K]``, any
    one unit; the result in that unit). Example: [0, 2) and [1, 3) and [5, 6) -> 4."""
    if len(starts) == 0:
        return 0.0
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], np.maximum.accumulate(ends[order])  # e: running end of the merged run
    new = np.r_[True, s[1:] > e[:-1]]  # an interval that starts a new merged run
    last = np.r_[np.flatnonzero(new)[1:] - 1, len(s) - 1]  # the last interval of each run
    return float((e[last] - s[new]).sum())


def timed_on_device(fn: Callable[[], object], device: torch.device) -> tuple[object, float, dict[str, float] | None]:
    """``(fn(), wall seconds, gpu)``: ``gpu`` (CUDA only, else None) holds ``busy_s``, the union
    of the GPU's kernel, memcpy and memset intervals as ``torch.profiler`` traces them
    (GPU activity only, no CPU op tracing), and ``kernel_s``, the union of the kernels alone."""
    if device.type != "cuda":
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        result = fn()
        _sync(device)
        wall = time.perf_counter() - start
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    span = np.array([(e.time_range.start, e.time_range.end) for e in events], dtype=np.float64).reshape(-1, 2)
    kernel = np.array([getattr(e, "activity_type", None) in (None, "kernel") and "emcpy" not in e.name
                       and "emset" not in e.name for e in events], dtype=bool)
    gpu = {"busy_s": union_seconds(span[:, 0], span[:, 1]) / 1e6,
           "kernel_s": union_seconds(span[kernel, 0], span[kernel, 1]) / 1e6, "events": len(events)}
    return result, wall, gpu


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions on (``tf32``) or off (``ieee``), restored after."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


# --------------------------------------------------------------------------- the stages
class Bench:
    """The run's state: data, folders under ``work``, the results and errors so far."""

    def __init__(self, args: argparse.Namespace, device: torch.device, reference: torch.device) -> None:
        self.args, self.device, self.reference = args, device, reference
        self.work: Path = args.work
        self.images, self.proposals, self.weights = load_prepared(args.data, args.images, args.windows)
        self.scales = {"1scale": tuple(args.scales1), "5scale": tuple(args.scales5)}
        self.results: dict[str, object] = {"stages": {}, "errors": {}}
        self.table: list[tuple[str, str]] = []

    def section(self, name: str, fn: Callable[[], None], needs: tuple[str, ...] = ()) -> None:
        """Run ``fn``; a failure (or a failed section it ``needs``) goes to ``errors[name]``."""
        failed = [n for n in needs if n in self.results["errors"]]
        if failed:
            self.results["errors"][name] = f"skipped: needs {failed}"
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001  (recorded, the run goes on: one GPU run says all it can)
            lines = traceback.format_exc().strip().splitlines()
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}\n" + "\n".join(lines[-6:])
            print(f"bench.gpu: section {name} failed: {type(exc).__name__}: {exc}")

    def folder(self, name: str) -> Path:
        """A fresh folder ``work/name`` (stages are timed afresh every run)."""
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def warm_up(self) -> None:
        """cuDNN and the pooling kernel loaded before anything is timed (1 image, every scale)."""
        trunk = prepare_trunk(build_trunk(BACKBONE, str(self.weights)), self.device)
        norm = resolve_normalization(BACKBONE, str(self.weights))
        conv_maps(trunk, norm, load_image_rgb(self.images[0].path), sorted(set(self.scales["5scale"]) | set(self.scales["1scale"])),
                  self.device)
        spatial_pyramid_pool(torch.zeros(1, 2, 2), torch.zeros((1, 4), dtype=torch.int64))  # compile the CPU kernel
        _sync(self.device)

    def extract(self, name: str) -> Callable[[], object]:
        scales = self.scales[name]
        settings = ExtractSettings(backbone=BACKBONE, weights=str(self.weights), scales=scales, max_proposals=self.args.windows)
        return lambda: run_extract(self.images, Path(self.args.data) / "proposals", self.folder(f"feat-{name}"), settings,
                                   image_set=IMAGE_SET, device=self.device)

    def finetune(self) -> object:
        steps = (self.args.iterations * 3 // 4,)  # bench.detect_speed's schedule
        settings = FinetuneSettings(fc_dim=self.args.fc_dim, iterations=self.args.iterations, base_lr=0.02, lr_steps=steps,
                                    round_iterations=min(100, self.args.iterations))
        return run_finetune([self.work / "feat-1scale"], self.folder("head"), settings, device=self.device)

    def train_svm(self) -> object:
        c = 1e-3 * 5011 / len(self.images)  # bench/detection.py: the release's C scaled to the training-set size
        return run_train_svm([self.work / "feat-1scale"], self.folder("svm"), SVMSettings(layer="fc7", C=c, bbox=True),
                             head_folder=self.work / "head", device=self.device)

    def detect(self, name: str) -> Callable[[], DetectSummary]:
        def run() -> DetectSummary:
            return run_detect(self.work / f"feat-{name}", self.work / "svm", self.folder(f"dets-{name}"),
                              DetectSettings(bbox=True), device=self.device)
        return run

    def stage(self, name: str, fn: Callable[[], object]) -> None:
        """Run stage ``name`` once plainly (its time and images/s), once more under the GPU
        profiler on CUDA (its CPU-wait share)."""
        start = time.perf_counter()
        summary = fn()
        wall = time.perf_counter() - start
        seconds = float(getattr(summary, "seconds", 0.0)) or wall
        entry: dict[str, object] = {"seconds": seconds, "wall_s": wall}
        done = getattr(summary, "done", None)
        if done:
            entry.update(images=done, images_per_second=done / seconds)
        if isinstance(summary, DetectSummary):
            phases = dict(summary.timings)
            phases["untimed"] = max(0.0, seconds - sum(phases.values()))
            entry["phases_s"] = phases
            entry["cpu_side_share"] = (phases["decode"] + phases["nms"] + phases["untimed"]) / seconds
            entry["upload_s"] = self._upload_seconds(self.work / f"feat-{name.split('_')[1]}")
        elif name.startswith("extract"):
            read, conv = self._bare_conv(self.scales[name.split("_")[1]])
            entry["phases_s"] = {"read_decode": read, "conv": conv, "assign_compress_write": max(0.0, seconds - read - conv)}
            entry["cpu_side_share"] = max(0.0, 1.0 - conv / seconds)
        else:
            entry["cpu_side_share"] = None  # no timing summary: the profiler's share only (CUDA)
        entry["device_idle_share"] = None
        if self.device.type == "cuda":
            try:
                _, profiled_wall, gpu = timed_on_device(fn, self.device)
                entry["profiled"] = {"wall_s": profiled_wall, **gpu}
                entry["device_idle_share"] = max(0.0, 1.0 - gpu["busy_s"] / profiled_wall)
            except Exception as exc:  # noqa: BLE001  (the plain run's numbers stand; the phases' share is used)
                entry["profiler_error"] = f"{type(exc).__name__}: {exc}"
        profiled = entry["device_idle_share"] is not None
        share = entry["device_idle_share"] if profiled else entry["cpu_side_share"]
        entry["cpu_wait_share"] = share
        entry["cpu_wait_share_from"] = "profiler" if profiled else ("phases" if share is not None else None)
        self.results["stages"][name] = entry
        rate = f", {entry['images_per_second']:7.1f} img/s" if "images_per_second" in entry else ""
        wait = "n/a (no timing summary; profiled on CUDA only)" if share is None else (
            f"{share:.0%} ({'GPU idle, profiler' if profiled else 'CPU-side phases'})")
        self.table.append((f"{name}: time; waiting on the CPU", f"{seconds:8.2f} s{rate}; {wait}"))

    def _bare_conv(self, scales: tuple[int, ...]) -> tuple[float, float]:
        """Seconds over the images of reading + decoding the JPEGs, and of the conv pass alone."""
        trunk = prepare_trunk(build_trunk(BACKBONE, str(self.weights)), self.device)
        norm = resolve_normalization(BACKBONE, str(self.weights))
        start = time.perf_counter()
        pixels = [load_image_rgb(im.path) for im in self.images]
        read = time.perf_counter() - start
        _sync(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            for rgb in pixels:
                conv_maps(trunk, norm, rgb, scales, self.device)
        _sync(self.device)
        return read, time.perf_counter() - start

    def _upload_seconds(self, cache_folder: Path) -> float:
        """Seconds of copying every image's decoded maps to the device once (pageable memory;
        inside detect's ``pool`` time, which copies them per batch of windows)."""
        seconds = 0.0
        for image in FeatureCache(cache_folder):
            _sync(self.device)
            start = time.perf_counter()
            for fmap in image.maps:
                fmap.to(self.device)
            _sync(self.device)
            seconds += time.perf_counter() - start
        return seconds

    # ----------------------------------------------------------------------- CUDA against the CPU
    def differences(self) -> None:
        """Max abs differences, device against reference, on the first ``--compare-images``
        images, with TF32 on and off (the reference CPU's numbers do not depend on TF32)."""
        folder = export_model(self.work / "svm", self.work / "feat-1scale", self.folder("model"), weights=self.weights)
        models = {"reference": load_model(folder, device=self.reference), "device": load_model(folder, device=self.device)}
        chosen = self.images[: self.args.compare_images]
        inputs = [(load_image_rgb(im.path), self.proposals[im.image_id]) for im in chosen]
        reference = [_chain(models["reference"], rgb, boxes) for rgb, boxes in inputs]
        out: dict[str, object] = {"images": [im.image_id for im in chosen], "scales": list(models["device"].scales)}
        for mode, enabled in (("tf32_on", True), ("tf32_off", False)):
            with tf32(enabled):
                found = [_chain(models["device"], rgb, boxes) for rgb, boxes in inputs]
            out[mode] = _compare(reference, found)
            d = out[mode]
            self.table.append((f"{self.device} - {self.reference}, {mode}: maps / pooled / fc7 / scores",
                               " / ".join(f"{d[k]['max_abs']:.2e}" for k in ("maps", "pooled", "fc7", "scores"))))
            self.table.append((f"{self.device} - {self.reference}, {mode}: detections matched; max score diff",
                               f"{d['detections']['matched_share']:.3f}; {d['detections']['max_abs_score']:.2e}"))
        self.results["differences"] = out


@torch.inference_mode()
def _chain(model, rgb: np.ndarray, boxes: np.ndarray) -> dict[str, object]:
    """Every intermediate of one image on ``model.device``, as CPU tensors: ``maps`` (float32
    conv maps, one ``Tensor[C, h, w]`` per scale), ``pooled`` ``Tensor[N, D]`` (from the
    fp16-rounded maps, as the cache holds them), ``fc7`` ``Tensor[N, fc_dim]``, ``scores``
    ``Tensor[N, classes]`` and ``detections`` (predict's boxes, scores, labels)."""
    device = model.device
    maps = conv_maps(model.trunk(), NORMALIZATIONS[model.input_norm], rgb, model.scales, device)
    cached = model.windows_and_maps(rgb, boxes)
    pooled = cached.features(None, device)
    head = model.scorer.head
    fc7 = head.features(pooled.clone(), "fc7")
    scores = model.scorer.scores(fc7.clone())
    pred = model.predict(rgb, proposals=boxes)
    return {"maps": [m.cpu() for m in maps], "pooled": pooled.cpu(), "fc7": fc7.cpu(), "scores": scores.cpu(),
            "detections": (pred.boxes.cpu(), pred.scores.cpu(), pred.labels.cpu())}


def _max_abs(ref: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    """Largest ``|other - ref|`` over the tensors, and the largest ``|ref|`` (its scale)."""
    return {"max_abs": max(float((o.double() - r.double()).abs().max()) if r.numel() else 0.0 for r, o in zip(ref, other)),
            "ref_max_abs": max(float(r.abs().max()) if r.numel() else 0.0 for r in ref)}


def _compare(reference: list[dict], found: list[dict]) -> dict[str, object]:
    """Differences of :func:`_chain`'s outputs over the images."""
    out: dict[str, object] = {"maps": _max_abs([m for r in reference for m in r["maps"]], [m for f in found for m in f["maps"]])}
    for key in ("pooled", "fc7", "scores"):
        out[key] = _max_abs([r[key] for r in reference], [f[key] for f in found])
    matched, total, score_diff, box_diff, counts = 0, 0, 0.0, 0.0, []
    for r, f in zip(reference, found):
        m, s, b = _match(r["detections"], f["detections"])
        matched, total = matched + m, total + len(r["detections"][1])
        score_diff, box_diff = max(score_diff, s), max(box_diff, b)
        counts.append([len(r["detections"][1]), len(f["detections"][1])])
    out["detections"] = {"counts_reference_device": counts, "matched_share": matched / total if total else 1.0,
                         "max_abs_score": score_diff, "max_abs_box": box_diff}
    return out


def _match(ref: tuple[torch.Tensor, ...], other: tuple[torch.Tensor, ...]) -> tuple[int, float, float]:
    """``(matched, max score diff, max box diff)``: each reference detection matched to the
    other side's detection of its class with the highest IoU, when that is >= :data:`MATCH_IOU`."""
    (rb, rs, rl), (ob, os_, ol) = ref, other
    if len(rs) == 0 or len(os_) == 0:
        return 0, 0.0, 0.0
    iou = box_iou(rb, ob) * (rl[:, None] == ol[None, :])  # [R, O], 0 across classes
    best, index = iou.max(dim=1)
    hit = best >= MATCH_IOU
    if not bool(hit.any()):
        return 0, 0.0, 0.0
    return (int(hit.sum()), float((rs[hit] - os_[index[hit]]).abs().max()),
            float((rb[hit] - ob[index[hit]]).abs().max()))


# --------------------------------------------------------------------------- main
def _scales(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", type=Path, default=None, metavar="DIR",
                        help="write the data folder (images, proposals, weights) into DIR and stop")
    parser.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help="a folder made by --prepare [default: prepared under --work from ../shared/data]")
    parser.add_argument("--voc-root", type=Path, default=VOC_ROOT, help="--prepare: the VOCdevkit to take images from")
    parser.add_argument("--max-pixels", type=int, default=1_000_000, help="--prepare: selective search's image size cap")
    parser.add_argument("--workers", type=int, default=2, help="--prepare: selective search processes")
    parser.add_argument("--images", type=int, default=10, help="images prepared / run")
    parser.add_argument("--windows", type=int, default=2000, help="proposals per image (the first N)")
    parser.add_argument("--compare-images", type=int, default=2, help="images compared against --reference")
    parser.add_argument("--scales1", type=_scales, default=(688,), help="the 1-scale setting")
    parser.add_argument("--scales5", type=_scales, default=PAPER_SCALES, help="the 5-scale setting (paper 4.1)")
    parser.add_argument("--fc-dim", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=200, help="fine-tuning iterations")
    add_device_option(parser, default="cuda")
    parser.add_argument("--reference", default="cpu", help="the device compared against")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-gpu"))
    parser.add_argument("--json", type=Path, default=None)
    args = smoke_args(parser, images=3, windows=100, max_pixels=60_000, scales1=(240,), scales5=(240, 336), fc_dim=64,
                      iterations=10, device="cpu:0", workers=1)
    if args.prepare is not None:
        prepare(args.prepare, args.voc_root, args.images, ProposalSettings(max_pixels=args.max_pixels), SQUEEZENET_FILE,
                workers=args.workers)
        print(f"prepared {args.images} images, their proposals and {SQUEEZENET_FILE.name} in {args.prepare}")
        return
    try:
        device, reference = resolve_device(args.device), resolve_device(args.reference)
    except ValueError as exc:
        parser.error(str(exc))
    if args.data is None:
        if not (args.voc_root / "VOC2007").is_dir():
            parser.error(f"no --data folder and no {args.voc_root}: run --prepare DIR where the data is, carry DIR here")
        args.data = args.work / "data"
        if not (args.data / PREPARED).is_file():
            prepare(args.data, args.voc_root, args.images, ProposalSettings(max_pixels=args.max_pixels), SQUEEZENET_FILE,
                    workers=args.workers)
    t_start = time.perf_counter()
    bench = Bench(args, device, reference)
    res = bench.results
    res.update({
        "machine": machine(), "device_given": args.device, "device": str(device), "reference_device": str(reference),
        "data": str(args.data), "images": len(bench.images), "backbone": BACKBONE, "fc_dim": args.fc_dim,
        "finetune_iterations": args.iterations, "scales": {k: list(v) for k, v in bench.scales.items()},
        "windows_per_image": float(np.mean([len(v) for v in bench.proposals.values()])),
        "tf32_during_stages": {"matmul": torch.backends.cuda.matmul.fp32_precision,
                               "cudnn_conv": torch.backends.cudnn.conv.fp32_precision},
    })
    bench.section("warm_up", bench.warm_up)
    for name in ("1scale", "5scale"):
        bench.section(f"extract_{name}", lambda name=name: bench.stage(f"extract_{name}", bench.extract(name)), ("warm_up",))
    bench.section("finetune", lambda: bench.stage("finetune", bench.finetune), ("extract_1scale",))
    bench.section("train_svm", lambda: bench.stage("train_svm", bench.train_svm), ("finetune",))
    for name in ("1scale", "5scale"):
        bench.section(f"detect_{name}", lambda name=name: bench.stage(f"detect_{name}", bench.detect(name)),
                      ("train_svm", f"extract_{name}"))
    bench.section("differences", bench.differences, ("train_svm",))
    stages = res["stages"]
    res["images_per_second"] = {k: stages.get(k, {}).get("images_per_second") for k in RUNS if "svm" not in k and "fine" not in k}
    res["cpu_wait_share"] = {k: stages.get(k, {}).get("cpu_wait_share") for k in RUNS}
    rate = res["images_per_second"]["detect_5scale"]
    res["target"] = {"detect_5scale_images_per_second": TARGET_DETECT_5SCALE,
                     "met": None if device.type != "cuda" or rate is None else rate >= TARGET_DETECT_5SCALE}
    res["wall_seconds"] = time.perf_counter() - t_start
    print_table(bench.table, f"bench.gpu: {len(bench.images)} images on {device} (given as {res['device_given']!r}) "
                             f"against {reference}, {res['windows_per_image']:.0f} windows per image")
    for name, error in res["errors"].items():
        print(f"\nerror in {name}: {error}")
    write_json(args.json, res)
    if res["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
