"""Helpers shared by the benchmarks: paths, timing, table printing, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# SPP_DETECT_SHARED_DATA overrides the location (e.g. for a git worktree elsewhere).
SHARED_DATA = Path(os.environ.get("SPP_DETECT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
VOC_ROOT = SHARED_DATA / "voc2007-mini"
SQUEEZENET_FILE = SHARED_DATA / "weights" / "squeezenet1_0-imagenet-deepcompression.pth"
MOBILENET_FILE = SHARED_DATA / "weights" / "mobilenet_v2-imagenet1001-coral.pth"
#: backbone name (spp_detect.backbones) -> its ImageNet-pretrained trunk on disk
WEIGHTS = {"squeezenet1_0": SQUEEZENET_FILE, "mobilenet_v2": MOBILENET_FILE}


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Smallest wall time of ``repeats`` calls, in seconds (the least noisy estimate)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_table(rows: list[tuple[str, str]], title: str) -> None:
    """Two-column table: name, value."""
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}\n" + "-" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def write_json(path: Path | None, payload: dict[str, object]) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True))
        print(f"\nwrote {path}")


def proposals_file(path: Path, boxes: dict) -> Path:
    """Windows a benchmark makes itself (image id -> ``np.ndarray[M, 4]`` 0-based xyxy: a
    grid, a cut or padded list) as an R-CNN ``.mat`` proposals file: what ``run_extract``
    reads, as ``extract --proposals file.mat`` (the file's SHA-256 keys the cache)."""
    from proposals.io import save_mat

    path.parent.mkdir(parents=True, exist_ok=True)
    return save_mat(path, boxes)


def add_device_option(parser: argparse.ArgumentParser, default: str = "cpu") -> None:
    """``--device`` on ``parser``, the same in every benchmark: a main resolves it once with
    :func:`spp_detect.device.resolve_device` (the one device rule: a canonical ``torch.device``,
    so that ``cpu:0`` and ``cpu`` give the same results) and uses that device alone
    (tests/test_bench_smoke.py checks this statically)."""
    parser.add_argument("--device", default=default,
                        help="where the stages run: auto, cpu, cuda, cuda:N (spp_detect.device.resolve_device; "
                             "any spelling of one device gives the same results)")


def smoke_args(parser: argparse.ArgumentParser, **smoke: object) -> argparse.Namespace:
    """``parser.parse_args()`` with a ``--smoke`` flag: a few images, seconds, numbers that
    mean nothing, for the test suite (tests/test_bench_smoke.py), so that a benchmark that
    breaks fails CI. Under ``--smoke`` each ``smoke`` value replaces its option's default
    (an option given on the command line wins); a ``work`` folder defaults to a fresh
    temporary one."""
    parser.add_argument("--smoke", action="store_true", help="a few images, seconds: checks that the benchmark runs")
    args = parser.parse_args()
    if args.smoke:
        for name, value in smoke.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        if "work" in vars(args) and args.work == parser.get_default("work"):
            args.work = Path(tempfile.mkdtemp(prefix="bench-smoke-"))
            print(f"smoke run in {args.work}")
    return args
