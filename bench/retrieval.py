"""Benchmark of R-MAC retrieval on the 322 real Paris6k images of ../shared/data/paris6k-subset
(14 queries; its README gives the protocol and why the mAP is not comparable to published
Paris6k numbers).

For each backbone on disk (SqueezeNet v1.0, MobileNetV2): index the 322 images at full
resolution (PCA-whitening and the quantisation cap learned on the first ``--whiten-limit``
VOC2007 images of voc2007-mini, not on Paris), describe the 14 cropped queries, and report
the mAP of MAC, R-MAC, R-MAC + AML (re-ranking the top ``--rerank``) and R-MAC + AML + QE
(top 5), each with and without whitening; also without the 3-positive query triomphe_5.
AML localisations do not depend on whitening, so they are computed once per query and image.

Timed (seconds per query, default backbone): describing the query (CNN), the first search,
AML re-ranking of the top 100 and of all 322 images (``--timing-queries`` queries, fresh
localisations). Index size: bytes per image on disk.

JSON: ``map`` (default backbone, whitened: ``mac``, ``rmac``, ``rmac+aml``,
``rmac+aml+qe``), ``table`` (every backbone x method x whitening), ``seconds_per_query``,
``bytes_per_image``. Index folders are cached under ``--cache`` and reused (the index stage
is resumable); a cold run builds them.

Usage: ``python -m bench.retrieval [--json bench/results/retrieval.json]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import SHARED_DATA, add_device_option, machine, print_table, smoke_args, write_json
from eval.retrieval import load_paris_ground_truth, mean_average_precision
from spp_detect.backbones import build_trunk, resolve_normalization
from spp_detect.device import resolve_device
from spp_detect.image_trunk import load_image_rgb, prepare_trunk
from spp_detect.retrieval.index import IndexSettings, list_images, load_index, run_index
from spp_detect.retrieval.search import describe_query, search

PARIS = SHARED_DATA / "paris6k-subset"
WEIGHTS = {
    "squeezenet1_0": SHARED_DATA / "weights" / "squeezenet1_0-imagenet-deepcompression.pth",
    "mobilenet_v2": SHARED_DATA / "weights" / "mobilenet_v2-imagenet1001-coral.pth",
}
METHODS = ("mac", "rmac", "rmac+aml", "rmac+aml+qe")
GROUND_TRUTH = "gnd_paris6k_subset.json"


def ground_truth_subset(queries: int, out: Path) -> tuple[Path, list[Path]]:
    """The ground truth of the first ``queries`` queries alone, written to ``out``, and the
    database images it names (each query's image, its ok and junk images), for ``--smoke``."""
    data = json.loads((PARIS / GROUND_TRUTH).read_text())
    gnd = data["gnd"][:queries]
    keep = sorted({i for g in gnd for i in g["ok"] + g["junk"]} | {data["imlist"].index(q) for q in data["qimlist"][:queries]})
    where = {old: new for new, old in enumerate(keep)}
    subset = {
        "imlist": [data["imlist"][i] for i in keep], "qimlist": data["qimlist"][:queries], "qnames": data["qnames"][:queries],
        "gnd": [{**g, "ok": [where[i] for i in g["ok"]], "junk": [where[i] for i in g["junk"]]} for g in gnd],
    }
    out.write_text(json.dumps(subset))
    return out, [PARIS / "jpg" / f"{name}.jpg" for name in subset["imlist"]]


def run_backbone(backbone: str, args: argparse.Namespace, timing: bool, device: torch.device) -> dict[str, object]:
    out: dict[str, object] = {}
    folder = args.cache / backbone
    start = time.perf_counter()
    settings = IndexSettings(backbone=backbone, weights=str(WEIGHTS[backbone]), whiten_limit=args.whiten_limit)
    whiten = list_images(SHARED_DATA / "voc2007-mini" / "VOC2007" / "JPEGImages")
    database = list_images(PARIS / "jpg")
    gnd_file = PARIS / GROUND_TRUTH
    if args.queries is not None:
        gnd_file, database = ground_truth_subset(args.queries, args.cache / "gnd_subset.json")
    summary = run_index(database, folder, settings, whiten, device=device)
    out["index_seconds"] = time.perf_counter() - start
    out["indexed_now"] = summary.done
    index = load_index(folder)
    out["bytes_per_image"] = index.bytes_per_image()
    queries = load_paris_ground_truth(gnd_file, index.names)
    trunk = prepare_trunk(build_trunk(backbone, settings.weights), device)
    norm = resolve_normalization(backbone, settings.weights)
    rankings: dict[tuple[str, bool], list[np.ndarray]] = {}
    cnn, first, aml = [], [], []
    for query in queries:
        start = time.perf_counter()
        described = describe_query(trunk, norm, load_image_rgb(PARIS / "jpg" / f"{query.image}.jpg"), query.box, settings.levels)
        cnn.append(time.perf_counter() - start)
        localized: dict = {}
        for whitened in (True, False):
            for method in ("mac", "rmac"):
                result = search(index, described, method=method, whiten=whitened)
                rankings.setdefault((method, whitened), []).append(result.order)
                first.append(result.seconds["search"])
            fresh = len(localized) == 0
            result = search(index, described, whiten=whitened, rerank=args.rerank, localized=localized)
            if fresh:
                aml.append(result.seconds["aml"])
            rankings.setdefault(("rmac+aml", whitened), []).append(result.order)
            result = search(index, described, whiten=whitened, rerank=args.rerank, qe=5, localized=localized)
            rankings.setdefault(("rmac+aml+qe", whitened), []).append(result.order)
    keep = [i for i, q in enumerate(queries) if q.name != "triomphe_5"]
    table = {}
    for (method, whitened), ranks in rankings.items():
        value, aps = mean_average_precision(ranks, queries)
        table[f"{method}/{'whitened' if whitened else 'plain'}"] = {
            "map": value, "map_without_triomphe_5": float(aps[keep].mean()),
            "ap": {q.name: float(a) for q, a in zip(queries, aps)},
        }
    out["table"] = table
    out["seconds_per_query"] = {"describe_query_cnn": float(np.mean(cnn)), "first_search": float(np.mean(first)),
                                f"aml_rerank_{args.rerank}": float(np.mean(aml))}
    if timing:
        timed = []
        for query in queries[: args.timing_queries]:
            described = describe_query(trunk, norm, load_image_rgb(PARIS / "jpg" / f"{query.image}.jpg"), query.box, settings.levels)
            result = search(index, described, rerank=len(index))
            timed.append(result.seconds["aml"])
        per_query = float(np.mean(timed))
        out["seconds_per_query"][f"aml_rerank_all_{len(index)}"] = per_query
        out["seconds_per_query"]["aml_per_1000_images"] = per_query / len(index) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="squeezenet1_0,mobilenet_v2")
    parser.add_argument("--rerank", type=int, default=100, help="AML re-ranks the top N of the first search")
    parser.add_argument("--whiten-limit", type=int, default=100, help="VOC2007 images to learn whitening on")
    parser.add_argument("--timing-queries", type=int, default=2, help="queries timed for AML over all images")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-retrieval"), help="index folders (reused)")
    parser.add_argument("--queries", type=int, default=None,
                        help="only the first N queries, on a database of the images their ground truth names")
    add_device_option(parser)
    parser.add_argument("--json", type=Path, default=None)
    args = smoke_args(parser, backbones="squeezenet1_0", queries=1, whiten_limit=20, rerank=10, timing_queries=1)
    if args.smoke and args.cache == parser.get_default("cache"):
        args.cache = Path(tempfile.mkdtemp(prefix="bench-retrieval-smoke-"))
    if args.queries is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    torch.set_num_threads(2)
    wall = time.perf_counter()
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    results = {b: run_backbone(b, args, timing=i == 0, device=device) for i, b in enumerate(backbones)}
    default = results[backbones[0]]
    rows = []
    for backbone, res in results.items():
        for method in METHODS:
            white, plain = res["table"][f"{method}/whitened"], res["table"][f"{method}/plain"]
            rows.append((f"{backbone:<14} {method:<12}",
                         f"whitened {100 * white['map']:5.1f} ({100 * white['map_without_triomphe_5']:5.1f} w/o triomphe_5)"
                         f"   plain {100 * plain['map']:5.1f} ({100 * plain['map_without_triomphe_5']:5.1f})"))
    print_table(rows, f"Paris6k subset, 322 images, 14 queries: mAP (AML re-ranks the top {args.rerank})")
    timing_rows = [(k, f"{v:.3f} s") for k, v in default["seconds_per_query"].items()]
    timing_rows += [(f"index bytes/image ({b})", f"{r['bytes_per_image'] / 1e3:.0f} kB") for b, r in results.items()]
    print_table(timing_rows, f"{backbones[0]}: seconds per query, index size")
    total = time.perf_counter() - wall
    print(f"\nbench wall time {total:.0f} s")
    write_json(args.json, {
        "map": {m: default["table"][f"{m}/whitened"]["map"] for m in METHODS},
        "table": {b: r["table"] for b, r in results.items()},
        "seconds_per_query": default["seconds_per_query"],
        "bytes_per_image": {b: r["bytes_per_image"] for b, r in results.items()},
        "index_seconds": {b: r["index_seconds"] for b, r in results.items()},
        "settings": {"backbones": backbones, "default_backbone": backbones[0], "rerank": args.rerank,
                     "qe": 5, "whiten_on": f"first {args.whiten_limit} images of voc2007-mini/VOC2007/JPEGImages",
                     "timing_queries": args.timing_queries},
        "wall_seconds": total,
        "machine": machine(),
        "device": str(device),
        "device_given": args.device,
    })


if __name__ == "__main__":
    main()
