"""How training scales with the training set: train-svm (``pool`` and ``fc7 --bbox``) and
finetune on the first 100, 200, 450 and 900 training images at one scale, each run in a
fresh subprocess (wall time and that process's peak resident memory, ``ru_maxrss``); the
compiled SVM solver (``dcd``) beside scikit-learn's ``LinearSVC`` (``liblinear``) on the
smallest size: per-class objective on the same final problems and detection mAP on the
test cache; and a linear extrapolation of time and memory to VOC2007 trainval (5,011
images) and VOC07+12 (16,551).

Training subsets: ``WORK/subset-<n>/`` holds, per training cache, a folder of links to the
first images (in the caches' order) and a copy of the cache's manifest (the same extract
key: the files are the cache's own). Stage folders under ``WORK`` are keyed by size, layer,
solver and settings and reused when finished (remove them to re-measure).

The solver comparison: a third train-svm run at the smallest size (not timed) hands each
class's final problem (positives and final negative cache, float16) to LinearSVC at the
release's tolerance (0.1) and to a cold ``dcd`` solve at :data:`TIGHT_TOL` (a near-optimum
reference); the objectives of the run's own (warm-started, train-svm's tolerance) ``dcd``
solution, of LinearSVC's and of the tight solve are recorded (``solver_objective``). The
full ``dcd`` run and a full ``liblinear`` run at the release's tolerance are each
detected and evaluated on the test cache (``solver_map``).

JSON: ``train_svm_seconds[layer][n]``, ``train_svm_peak_mb[layer][n]``,
``finetune_seconds[n]``, ``finetune_peak_mb[n]``, ``solver_objective[layer][class]``,
``solver_map[layer][solver]``, ``extrapolation``, ``settings``.

Usage (the full run; caches at one scale, 688, SqueezeNet):
    python -m bench.train_scale --cache-1scale runs/feat1-mini-trainval --cache-1scale runs/feat1-plus-trainval \\
        --test-cache-1scale runs/feat1-mini-test --work runs/bench-train-scale --json bench/results/train_scale.json
``--smoke``: sizes 2 and 3, 20 fine-tuning iterations; without ``--cache-1scale`` it makes
its own caches first (3 trainval and 2 test images of voc2007-mini, the first 150
selective-search windows of each, one scale) under ``WORK``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import SHARED_DATA, SQUEEZENET_FILE, add_device_option, machine, print_table, write_json
from spp_detect.device import resolve_device
from svm.linear import LIBLINEAR_TOL, SVM_TOL

LAYERS = ("pool", "fc7")
#: A near-optimum reference solved beside (cold) in the comparison.
TIGHT_TOL = 0.001
EXTRAPOLATE = {"voc2007_trainval": 5011, "voc07+12_trainval": 16551}


# --------------------------------------------------------------------------- child processes
def _child(spec: dict, device: torch.device) -> dict:
    """Run one measured stage in this (fresh) process on ``device``; returns its figures."""
    torch.set_num_threads(int(spec.get("threads", 2)))
    start = time.perf_counter()
    out: dict = {}
    if spec["stage"] == "finetune":
        from spp_detect.finetune import FinetuneSettings, run_finetune

        settings = FinetuneSettings(**spec["settings"])
        summary = run_finetune(spec["caches"], spec["out"], settings, device=device)
        out["iterations"] = summary.iterations_run
    else:
        from svm.train import SVMSettings, run_train_svm

        settings = SVMSettings(**spec["settings"])
        hook = None
        if spec.get("compare"):
            from svm.linear import svm_objective, train_linear_svm

            objectives: dict[int, dict[str, float]] = {}

            def hook(c, pos, neg, w, b):
                w_ref, b_ref = train_linear_svm(pos, neg, summary_c, settings.pos_weight, settings.bias_mult,
                                                tol=LIBLINEAR_TOL, solver="liblinear")
                w_tight, b_tight = train_linear_svm(pos, neg, summary_c, settings.pos_weight, settings.bias_mult,
                                                    tol=TIGHT_TOL, solver="dcd")
                objectives[c] = {
                    "dcd": svm_objective(w, b, pos, neg, summary_c, settings.pos_weight, settings.bias_mult),
                    "liblinear": svm_objective(w_ref, b_ref, pos, neg, summary_c, settings.pos_weight, settings.bias_mult),
                    f"dcd_cold_tol{TIGHT_TOL:g}": svm_objective(w_tight, b_tight, pos, neg, summary_c, settings.pos_weight,
                                                                settings.bias_mult),
                    "positives": len(pos), "negatives": len(neg),
                }
        images = sum(len(list(Path(c).glob("*.npz"))) for c in spec["caches"])
        summary_c = settings.resolved_c(images)
        summary = run_train_svm(spec["caches"], spec["out"], settings, head_folder=spec.get("head"), force=True,
                                final_problem=hook, device=device)
        out.update(C=summary.C, negatives=sum(summary.negatives.values()), bbox_samples=summary.bbox_samples,
                   stage_seconds=summary.seconds)
        if spec.get("compare"):
            classes = json.loads((Path(spec["out"]) / "svm.json").read_text())["classes"]
            out["objective"] = {classes[c]: v for c, v in sorted(objectives.items())}
    out["seconds"] = time.perf_counter() - start
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return out


def measure(spec: dict, record: Path, device: torch.device) -> dict:
    """``spec`` run by :func:`_child` in a fresh interpreter on ``device`` (its ``--device``);
    its figures are kept in ``record`` (a finished record is reused)."""
    if record.is_file():
        return json.loads(record.read_text())
    record.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "bench.train_scale", "--child", json.dumps(spec),
                           "--device", str(device)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['stage']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    record.write_text(json.dumps(result, indent=2))
    return result


# --------------------------------------------------------------------------- subsets, keys
def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def subset(caches: list[Path], n: int, work: Path) -> list[Path]:
    """The first ``n`` images of ``caches`` (in order) as link folders under ``work``."""
    from spp_detect.cache import FeatureCache

    folders, left = [], n
    for k, cache in enumerate(caches):
        if left <= 0:
            break
        ids = FeatureCache(cache).image_ids[:left]
        left -= len(ids)
        folder = work / f"subset-{n}" / f"cache{k}-{_key(str(cache.resolve()), ids)}"
        if not folder.is_dir():
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copy(cache / "manifest.json", tmp / "manifest.json")
            for image_id in ids:
                (tmp / f"{image_id}.npz").symlink_to((cache / f"{image_id}.npz").resolve())
            tmp.rename(folder)
        folders.append(folder)
    if left > 0:
        raise SystemExit(f"the training caches hold {n - left} images, fewer than the size {n} asked for")
    return folders


def detect_map(test_cache: Path, svm_dir: Path, out: Path, voc_root: Path, device: torch.device) -> float:
    """Detect (with box regression when the model has it) every window of the test cache's
    images on ``device`` and evaluate them (VOC07 11-point mAP) against ``voc_root``'s test annotations."""
    from eval.voc import evaluate_voc
    from spp_detect.cache import FeatureCache
    from spp_detect.datasets import read_voc
    from spp_detect.datasets.voc import VOC_CLASSES
    from spp_detect.detect import DetectSettings, load_detections, run_detect
    from svm.train import load_svm

    model = load_svm(svm_dir, device)
    run_detect(test_cache, svm_dir, out, DetectSettings(bbox=model.regressor is not None), device=device, model=model)
    ids = set(FeatureCache(test_cache).image_ids)
    images = [im for im in read_voc(voc_root, "test") if im.image_id in ids]
    return float(evaluate_voc(load_detections(out, VOC_CLASSES), images).map)


def smoke_caches(folder: Path, voc_root: Path, device: torch.device, windows: int = 150) -> tuple[list[Path], Path]:
    """Tiny one-scale caches for ``--smoke``: 3 trainval and 2 test images of ``voc_root``,
    the first ``windows`` selective-search boxes of each, extracted on ``device``."""
    from proposals.run import ProposalSettings, run_proposals
    from spp_detect.datasets import read_voc
    from spp_detect.extract import ExtractSettings, run_extract

    out = []
    for split, count in (("trainval", 3), ("test", 2)):
        images = read_voc(voc_root, split, limit=count)
        props = folder / f"proposals-{split}"
        run_proposals(images, props, ProposalSettings(), {"year": "2007", "image_set": split}, workers=1)
        settings = ExtractSettings(backbone="squeezenet1_0", weights=str(SQUEEZENET_FILE), scales=(688,),
                                   max_proposals=windows)
        cache = folder / f"feat-{split}"
        run_extract(images, props, cache, settings, image_set=split, device=device)
        out.append(cache)
    return [out[0]], out[1]


def fit_line(sizes: list[int], values: list[float]) -> tuple[float, float]:
    """Least-squares ``value = a + b * n``."""
    b, a = np.polyfit(np.asarray(sizes, dtype=np.float64), np.asarray(values, dtype=np.float64), 1)
    return float(a), float(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-1scale", type=Path, action="append", default=[],
                        help="training cache at one scale (repeat: the images are taken in this order)")
    parser.add_argument("--test-cache-1scale", type=Path, default=None, help="test cache at one scale (mAP of the solvers)")
    parser.add_argument("--voc-root", type=Path, default=SHARED_DATA / "voc2007-mini", help="test annotations")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-train-scale"))
    parser.add_argument("--sizes", default="100,200,450,900")
    parser.add_argument("--fc-dim", type=int, default=1024)
    parser.add_argument("--finetune-iterations", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    add_device_option(parser)
    parser.add_argument("--no-compare", action="store_true", help="skip the LinearSVC comparison")
    parser.add_argument("--smoke", action="store_true", help="sizes 2,3; 20 fine-tuning iterations; own tiny caches")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child), device)))
        return
    if args.smoke:
        args.sizes, args.finetune_iterations = "2,3", 20
        if args.work == parser.get_default("work"):  # never reuse a full run's records
            args.work = Path(tempfile.mkdtemp(prefix="bench-train-scale-smoke-"))
        if not args.cache_1scale:
            args.cache_1scale, args.test_cache_1scale = smoke_caches(args.work.resolve() / "smoke-caches", args.voc_root, device)
    if not args.cache_1scale:
        parser.error("give --cache-1scale (the training caches at one scale)")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    wall = time.perf_counter()
    caches = [c.resolve() for c in args.cache_1scale]
    work = args.work.resolve()
    ft = {"fc_dim": args.fc_dim, "iterations": args.finetune_iterations,
          "lr_steps": [int(args.finetune_iterations * 0.75)], "base_lr": 0.02}
    result: dict = {"train_svm_seconds": {l: {} for l in LAYERS}, "train_svm_peak_mb": {l: {} for l in LAYERS},
                    "finetune_seconds": {}, "finetune_peak_mb": {}, "train_svm_detail": {l: {} for l in LAYERS}}
    rows = []
    heads: dict[int, Path] = {}
    for n in sizes:
        train = subset(caches, n, work)
        tag = f"n{n}-{_key([str(t) for t in train])}"
        head = work / tag / f"head-{_key(ft)}"
        fig = measure({"stage": "finetune", "caches": [str(t) for t in train], "out": str(head), "settings": ft,
                       "threads": args.threads}, work / tag / f"record-finetune-{_key(ft)}.json", device)
        heads[n] = head
        result["finetune_seconds"][str(n)], result["finetune_peak_mb"][str(n)] = fig["seconds"], fig["peak_mb"]
        rows.append((f"finetune n={n}", f"{fig['seconds']:7.0f} s  {fig['peak_mb']:7.0f} MB"))
        for layer in LAYERS:
            settings = {"layer": layer, "bbox": layer == "fc7", "solver": "dcd", "tol": SVM_TOL}
            spec = {"stage": "train-svm", "caches": [str(t) for t in train], "settings": settings,
                    "out": str(work / tag / f"svm-{layer}-dcd"), "head": str(head) if layer == "fc7" else None,
                    "threads": args.threads}
            fig = measure(spec, work / tag / f"record-svm-{layer}-dcd-{_key(spec)}.json", device)
            result["train_svm_seconds"][layer][str(n)] = fig["seconds"]
            result["train_svm_peak_mb"][layer][str(n)] = fig["peak_mb"]
            result["train_svm_detail"][layer][str(n)] = fig
            rows.append((f"train-svm {layer}{' --bbox' if layer == 'fc7' else ''} n={n}",
                         f"{fig['seconds']:7.0f} s  {fig['peak_mb']:7.0f} MB  (C {fig['C']:.4g}, {fig['negatives']} negatives)"))
            print(rows[-1][0], rows[-1][1], flush=True)

    if not args.no_compare:
        n = sizes[0]
        train = subset(caches, n, work)
        tag = f"n{n}-{_key([str(t) for t in train])}"
        result["solver_objective"], result["solver_map"], result["solver_seconds"] = {}, {}, {}
        for layer in LAYERS:
            base = {"stage": "train-svm", "caches": [str(t) for t in train],
                    "head": str(heads[n]) if layer == "fc7" else None, "threads": args.threads}
            lib = dict(base, settings={"layer": layer, "bbox": layer == "fc7", "solver": "liblinear", "tol": 0.1},
                       out=str(work / tag / f"svm-{layer}-liblinear"))
            fig_lib = measure(lib, work / tag / f"record-svm-{layer}-liblinear-{_key(lib)}.json", device)
            cmp = dict(base, settings={"layer": layer, "bbox": False, "solver": "dcd", "tol": SVM_TOL}, compare=True,
                       reference_tols=[LIBLINEAR_TOL, TIGHT_TOL],
                       out=str(work / tag / f"svm-{layer}-compare"))
            fig_cmp = measure(cmp, work / tag / f"record-svm-{layer}-compare-{_key(cmp)}.json", device)
            objective = fig_cmp["objective"]
            ratios = {k: v["dcd"] / v["liblinear"] for k, v in objective.items()}
            tight = {k: v[f"dcd_cold_tol{TIGHT_TOL:g}"] / v["liblinear"] for k, v in objective.items()}
            result["solver_objective"][layer] = {"per_class": objective, "max_ratio_dcd_over_liblinear": max(ratios.values()),
                                                 "min_ratio_dcd_over_liblinear": min(ratios.values()),
                                                 f"max_ratio_dcd_tol{TIGHT_TOL:g}_over_liblinear": max(tight.values())}
            result["solver_seconds"][layer] = {"dcd": result["train_svm_seconds"][layer][str(n)], "liblinear": fig_lib["seconds"]}
            maps = {}
            if args.test_cache_1scale is not None:
                for solver in ("dcd", "liblinear"):
                    svm_dir = work / tag / f"svm-{layer}-{solver}"
                    maps[solver] = detect_map(args.test_cache_1scale.resolve(), svm_dir, work / tag / f"det-{layer}-{solver}",
                                              args.voc_root, device)
                result["solver_map"][layer] = maps
            rows.append((f"solvers {layer} n={n}",
                         f"objective ratio dcd/liblinear {min(ratios.values()):.3f}..{max(ratios.values()):.3f} "
                         f"(dcd at tol {TIGHT_TOL:g}: max {max(tight.values()):.3f}); time dcd {result['solver_seconds'][layer]['dcd']:.0f} s, "
                         f"liblinear {fig_lib['seconds']:.0f} s"
                         + (f"; mAP dcd {100 * maps['dcd']:.1f}, liblinear {100 * maps['liblinear']:.1f}" if maps else "")))
            print(rows[-1][0], rows[-1][1], flush=True)

    extrapolation: dict = {}
    if len(sizes) >= 2:
        series = {f"train_svm_{l}": (result["train_svm_seconds"][l], result["train_svm_peak_mb"][l]) for l in LAYERS}
        series["finetune"] = (result["finetune_seconds"], result["finetune_peak_mb"])
        for name, (secs, peaks) in series.items():
            ns = [int(k) for k in secs]
            a_t, b_t = fit_line(ns, list(secs.values()))
            a_m, b_m = fit_line(ns, list(peaks.values()))
            extrapolation[name] = {label: {"seconds": a_t + b_t * m, "peak_mb": a_m + b_m * m} for label, m in EXTRAPOLATE.items()}
            extrapolation[name]["fit"] = {"seconds": [a_t, b_t], "peak_mb": [a_m, b_m]}
            for label, m in EXTRAPOLATE.items():
                e = extrapolation[name][label]
                rows.append((f"{name} -> {label} ({m})", f"{e['seconds'] / 60:7.1f} min  {e['peak_mb'] / 1024:6.2f} GB (linear fit)"))
    result["extrapolation"] = extrapolation
    growth = {}
    if "200" in result["finetune_seconds"] and "900" in result["finetune_seconds"]:
        growth = {l: result["train_svm_peak_mb"][l]["900"] / result["train_svm_peak_mb"][l]["200"] for l in LAYERS}
        rows.append(("peak memory growth 200 -> 900", ", ".join(f"{l} {g:.2f}x" for l, g in growth.items())))
    result["peak_growth_200_to_900"] = growth
    print_table(rows, "Training at scale: wall time and peak resident memory per stage (fresh process each)")
    total = time.perf_counter() - wall
    print(f"\nbench wall time {total:.0f} s")
    result["settings"] = {"sizes": sizes, "train_caches": [str(c) for c in caches],
                          "test_cache": str(args.test_cache_1scale) if args.test_cache_1scale else None,
                          "finetune": ft, "svm": "SVMSettings defaults (C auto, dcd, tol 0.01); fc7 with --bbox; liblinear at the release's tol 0.1",
                          "smoke": args.smoke, "threads": args.threads,
                          "device": str(device), "device_given": args.device}
    result["wall_seconds"] = total
    result["machine"] = machine()
    write_json(args.json, result)


if __name__ == "__main__":
    main()
