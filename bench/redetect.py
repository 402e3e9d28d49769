"""Check: re-run ``detect`` on every detection folder of a finished ``bench.detection`` work
folder with the current code, and compare with the stored per-image results, array for
array (boxes, scores, labels). Identical results mean an unchanged mAP: this is how a
change to the feature path (pooling kernel, batching, buffers) is shown not to move
the detection benchmark.

    python -m bench.redetect [--work runs/bench-detection] [--json bench/results/redetect.json]

About 2 minutes for the 12 folders of the default bench.detection run (60 test images).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine, write_json
from spp_detect.detect import DetectSettings, run_detect
from spp_detect.stage_dir import read_manifest
from svm.train import load_svm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-detection"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    keyed = lambda pattern: {read_manifest(p)["key"]: p for p in args.work.glob(pattern)  # noqa: E731
                             if (p / "manifest.json").is_file()}
    caches, models = keyed("feat-*"), keyed("svm-*")
    result: dict[str, object] = {"machine": machine(), "work": str(args.work), "folders": {}}
    for det in sorted(args.work.glob("dets-*")):
        config = read_manifest(det)["config"]
        if config["cache"] not in caches or config["model"] not in models:
            continue
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run_detect(caches[config["cache"]], tmp, load_svm(models[config["model"]]),
                       DetectSettings(**config["settings"]), model_key=config["model"])
            stored = sorted(det.glob("*.npz"))
            differ = [p.name for p in stored if not _same(p, Path(tmp) / p.name)]
        result["folders"][det.name] = {"images": len(stored), "differing_images": differ,
                                       "identical": not differ, "seconds": time.perf_counter() - start}
        print(f"{det.name}: {len(stored)} images, {'identical' if not differ else f'{len(differ)} differ'}", flush=True)
    result["all_identical"] = all(f["identical"] for f in result["folders"].values())
    print(f"all identical: {result['all_identical']}")
    write_json(args.json, result)


def _same(a: Path, b: Path) -> bool:
    with np.load(a) as x, np.load(b) as y:
        return all(np.array_equal(x[k], y[k]) for k in ("boxes", "scores", "labels"))


if __name__ == "__main__":
    main()
