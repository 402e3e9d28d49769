"""Soak test: kill a stage with SIGKILL at random moments, restart it, compare with a clean run.

``train-svm`` (:func:`soak_train_svm`, a small 1-scale cache of ``--svm-images`` images):
``--svm-kills`` (5) SIGKILLs at random moments of its mining pass, each restart resuming at the
last checkpoint; per kill, the images the killed run had mined, those its checkpoint held and
where the restart resumed (``per_kill``, ``remined_per_restart``, ``resumed_at_checkpoint``,
``remined_within_checkpoint_interval``); then the model byte for byte; then ``timing``: pooled
features, one kill at 60% of a clean run's time, ``rerun_over_clean`` = the rerun's time over
the clean run's. For ``extract``: a VOC tree of the first ``--images`` VOC2007 test images
(symlinked from ../shared/data), their selective-search proposals, then

1. one uninterrupted ``spp-detect extract`` run into ``reference/`` (timed: its start-up
   time and seconds per image size the kill moments);
2. ``--kills`` times: start the same command into ``soaked/``, SIGKILL its process group
   after a random delay (uniform between 0 and start-up + 1.6 x the time of 30/kills
   images, so that kills land in start-up, in the conv pass and in file writes, and the
   run never finishes on its own), and restart;
3. a last, uninterrupted restart, then the comparison: the same file names in both
   folders (so no temporary file is left) and every file byte for byte equal.

Prints a table and writes ``--json`` (keys per stage: ``kills``, ``restarts``,
``images``, ``equal``, ``identical_files``, ``differing_files``, ``missing_files``,
``temp_files_left``, ``temp_files_seen_after_kills``, ``done_after_each_kill``,
``kill_moments_s``, ``reference_seconds``, ``soak_seconds``).

Other stages join through :data:`SOAKS`: a function ``(args, work folder, rng, device) -> dict``
with the same keys (``device``: the resolved ``--device``, given to every command it runs);
it can reuse :func:`soak_command` for the kill/restart loop and
:func:`compare_folders` for the comparison.

    python -m bench.soak [--stage extract|train-svm] [--images 30] [--kills 20] [--svm-kills 5] [--json bench/results/soak.json]

About 4 minutes on an idle 2-core machine with the defaults; 14 minutes when the cores are
shared (bench/results/soak.json). The train-svm soak alone (24 images, data included): 8
minutes on shared cores.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO_ROOT, SQUEEZENET_FILE, VOC_ROOT, add_device_option, machine, print_table, smoke_args, write_json
from spp_detect.device import resolve_device


def spp_detect(args: list, quiet: bool = True, stderr=subprocess.PIPE, **kwargs) -> subprocess.Popen:
    """Start ``python -m cli ARGS`` in its own process group (so a kill takes its workers too);
    ``quiet``: with ``-q`` (else its log and progress bars go to ``stderr``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *(["-q"] if quiet else []), *map(str, args)], cwd=REPO_ROOT,
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr, **kwargs,
    )


def run_to_end(args: list) -> float:
    """Run ``spp-detect ARGS`` to completion; returns its wall seconds."""
    start = time.perf_counter()
    proc = spp_detect(args)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"spp-detect {' '.join(map(str, args))} failed:\n{err.decode()[-2000:]}")
    return time.perf_counter() - start


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*") if ".tmp" in p.name) if folder.exists() else []


def soak_command(args: list, out: Path, per_image: str, kills: int, max_delay: float, rng: random.Random) -> dict:
    """Start ``spp-detect ARGS`` and SIGKILL it after ``uniform(0, max_delay)`` seconds,
    ``kills`` times, then once more to the end. A run that ends before its kill is
    counted in ``finished_early`` and restarted."""
    moments, done, temps, early, restarts = [], [], set(), 0, 0
    start = time.perf_counter()
    while len(moments) < kills:
        delay = rng.uniform(0.0, max_delay)
        proc = spp_detect(args)
        restarts += 1
        try:
            proc.wait(timeout=delay)
            early += 1  # finished (or failed) before the kill
            if proc.returncode != 0:
                raise SystemExit(f"run failed: {proc.stderr.read().decode()[-2000:]}")
            continue
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        moments.append(round(delay, 3))
        done.append(len(list(out.glob(per_image))) if out.exists() else 0)
        temps.update(temp_files(out))
        print(f"  kill {len(moments):2d} at {delay:5.2f} s: {done[-1]} image(s) done, {len(temp_files(out))} temp file(s) left", flush=True)
    run_to_end(args)
    return {
        "kills": len(moments),
        "restarts": restarts,  # restarts after a kill (= starts - 1, the final run included)
        "finished_early": early,
        "kill_moments_s": moments,
        "done_after_each_kill": done,
        "temp_files_seen_after_kills": len(temps),
        "soak_seconds": round(time.perf_counter() - start, 1),
    }


def compare_folders(reference: Path, soaked: Path) -> dict:
    """Names and SHA-256 of every file in both folders."""

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}

    a, b = digests(reference), digests(soaked)
    identical = sorted(n for n in a if b.get(n) == a[n])
    differing = sorted(n for n in a if n in b and b[n] != a[n])
    return {
        "equal": a == b,
        "identical_files": len(identical),
        "differing_files": differing,
        "missing_files": sorted(set(a) - set(b)),
        "extra_files": sorted(set(b) - set(a)),
        "temp_files_left": temp_files(soaked),
    }


def _voc_tree(work: Path, images: int) -> tuple[list[str], list]:
    """A VOC tree under ``work`` with the first ``images`` VOC2007 test images (symlinked);
    returns their ids and the ``--voc-root/--image-set`` arguments."""
    ids = (VOC_ROOT / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()[:images]
    root = work / "voc" / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for sub in ("JPEGImages", "Annotations"):
        (root / sub).symlink_to(VOC_ROOT / "VOC2007" / sub)
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    return ids, ["--voc-root", work / "voc", "--image-set", "test"]


def soak_extract(args: argparse.Namespace, work: Path, rng: random.Random, device: torch.device) -> dict:
    ids, voc = _voc_tree(work, args.images)
    print(f"proposals for {len(ids)} images ...", flush=True)
    run_to_end(["proposals", *voc, "--workers", "2", "--out", work / "proposals"])

    def extract(out: Path) -> list:
        return ["extract", *voc, "--proposals", work / "proposals", "--weights", SQUEEZENET_FILE,
                "--scales", args.scales, "--device", str(device), "--out", out]

    print("uninterrupted extract ...", flush=True)
    started = time.perf_counter()
    proc = spp_detect(extract(work / "reference"))
    while not list((work / "reference").glob("0*.npz")) and proc.poll() is None:
        time.sleep(0.01)
    startup = time.perf_counter() - started
    proc.communicate()
    if proc.returncode != 0:
        raise SystemExit("the reference extract run failed")
    seconds = time.perf_counter() - started
    per_image = (seconds - startup) / max(len(ids) - 1, 1)
    max_delay = startup + 1.6 * per_image * len(ids) / args.kills
    print(f"start-up {startup:.1f} s, {per_image:.2f} s/image: kills within {max_delay:.1f} s of each start", flush=True)
    result = soak_command(extract(work / "soaked"), work / "soaked", "0*.npz", args.kills, max_delay, rng)
    return {
        "images": len(ids),
        "scales": args.scales,
        "reference_seconds": round(seconds, 1),
        "reference_startup_seconds": round(startup, 2),
        **result,
        **compare_folders(work / "reference", work / "soaked"),
    }


#: The mining progress bar (``mining:  42%|###   | 10/24 [...]``, counting the images the runs it resumed mined).
_MINING_BAR = re.compile(r"mining:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
_RESUMED = re.compile(r"resuming after (\d+) of (\d+) images")


def _checkpointed(out: Path) -> int | None:
    """Images mined by the train-svm checkpoint in ``out`` (None when it has none: killed
    before the positives' pass ended, or after the model was written)."""
    from svm.train import MINING_STATE

    try:
        with np.load(out / MINING_STATE) as state:
            return int(state["images_done"])
    except (OSError, ValueError, KeyError):
        return None


def _mined(log_text: str) -> int | None:
    """The last image count of the mining bar in a run's stderr (None: mining not started)."""
    found = _MINING_BAR.findall(log_text)
    return int(found[-1][0]) if found else None


def soak_mining(args: list, out: Path, kills: int, max_delay: float, images: int, rng: random.Random, logs: Path) -> dict:
    """Start ``spp-detect train-svm ARGS`` (logging, with its progress bar, to a file), wait until
    it mines, SIGKILL it ``uniform(0, max_delay)`` seconds later, ``kills`` times, then once
    more to the end. Per kill: the images the killed run had mined (its bar), the images its
    checkpoint holds, and where the next run resumed (its log): a restart re-mines only the
    images since the last checkpoint. A run that ends before its kill ends the soak there
    (``finished_early``: a resumed run has less left each time)."""
    from svm.train import CHECKPOINT_SHARE

    every = max(1, math.ceil(CHECKPOINT_SHARE * images))
    moments, done, temps, details, early, restarts = [], [], set(), [], 0, 0
    start = time.perf_counter()
    logs.mkdir(parents=True, exist_ok=True)
    previous: dict | None = None
    while len(moments) < kills:
        log_path = logs / f"run-{restarts}.log"
        with open(log_path, "wb") as err:
            proc = spp_detect(args, quiet=False, stderr=err)
        restarts += 1
        while proc.poll() is None and _mined(log_path.read_text(errors="replace")) is None:
            time.sleep(0.02)
        text = log_path.read_text(errors="replace")
        if previous is not None:
            resumed = _RESUMED.findall(text)
            previous["resumed_from"] = int(resumed[-1][0]) if resumed else None
        delay = rng.uniform(0.0, max_delay)
        try:
            proc.wait(timeout=delay)
            early += 1
            if proc.returncode != 0:
                raise SystemExit(f"train-svm failed:\n{log_path.read_text(errors='replace')[-2000:]}")
            previous = None
            break  # finished before its kill: nothing left to kill
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        mined = _mined(log_path.read_text(errors="replace")) or 0
        checkpointed = _checkpointed(out)
        moments.append(round(delay, 3))
        done.append(checkpointed or 0)
        temps.update(temp_files(out))
        model_written = (out / "svm.npz").is_file()  # killed after the model, before the checkpoint went
        previous = {"killed_after_mining_s": round(delay, 3), "mined_before_kill": mined, "checkpointed": checkpointed,
                    "model_written": model_written,
                    "remined_by_restart": 0 if model_written else max(0, mined - (checkpointed or 0)), "resumed_from": None}
        details.append(previous)
        print(f"  kill {len(moments):2d} {delay:5.2f} s into mining: {mined} image(s) mined, {checkpointed} checkpointed",
              flush=True)
    if previous is not None:  # the last restart, to the end
        log_path = logs / f"run-{restarts}.log"
        with open(log_path, "wb") as err:
            proc = spp_detect(args, quiet=False, stderr=err)
            proc.wait()
        if proc.returncode != 0:
            raise SystemExit(f"train-svm failed:\n{log_path.read_text(errors='replace')[-2000:]}")
        resumed = _RESUMED.findall(log_path.read_text(errors="replace"))
        previous["resumed_from"] = int(resumed[-1][0]) if resumed else None
    return {
        "kills": len(moments),
        "restarts": restarts,
        "finished_early": early,
        "kill_moments_s": moments,  # seconds after the run's mining started
        "done_after_each_kill": done,  # images checkpointed when killed
        "temp_files_seen_after_kills": len(temps),
        "soak_seconds": round(time.perf_counter() - start, 1),
        "checkpoint_every_images": every,
        "per_kill": details,
        "remined_per_restart": [d["remined_by_restart"] for d in details],
        # a restart resumes at the checkpoint the kill left (none: it starts over, or the model was done)
        "resumed_at_checkpoint": all(d["resumed_from"] == (None if d["model_written"] else d["checkpointed"]) for d in details),
        "remined_within_checkpoint_interval": all(d["remined_by_restart"] <= every for d in details),
    }


def _timed_mining_start(args: list, logs: Path, name: str) -> tuple[float, float]:
    """Run ``spp-detect ARGS`` to the end, logging to a file: ``(wall seconds, seconds
    until its mining started)``."""
    log_path = logs / f"{name}.log"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "wb") as err:
        proc = spp_detect(args, quiet=False, stderr=err)
    mining = None
    while proc.poll() is None:
        if mining is None and _mined(log_path.read_text(errors="replace")) is not None:
            mining = time.perf_counter() - start
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"spp-detect {' '.join(map(str, args))} failed:\n{log_path.read_text(errors='replace')[-2000:]}")
    return seconds, mining if mining is not None else seconds


def timing_check(train: Callable[[Path], list], work: Path, images: int) -> dict:
    """Issue 30's check: a clean run (``clean_seconds``), a run into another folder killed at
    60% of that time, and its rerun to the end (``rerun_seconds``): ``rerun_over_clean``,
    well under 0.7 when the checkpoint kept the mined images; and byte-identity."""
    clean, _ = _timed_mining_start(train(work / "timing-reference"), work / "logs", "timing-reference")
    out = work / "timing-killed"
    proc = spp_detect(train(out))
    kill_at = 0.6 * clean
    try:
        proc.wait(timeout=kill_at)
        finished = True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        finished = False
    proc.stderr.close()
    checkpointed = _checkpointed(out)
    rerun = run_to_end(train(out))
    compared = compare_folders(work / "timing-reference", out)
    return {
        "images": images,
        "features": "pool",
        "clean_seconds": round(clean, 2),
        "killed_at_s": round(kill_at, 2),
        "finished_before_kill": finished,
        "checkpointed_at_kill": checkpointed or 0,
        "rerun_seconds": round(rerun, 2),
        "rerun_over_clean": round(rerun / clean, 3),
        "equal": compared["equal"],
        "temp_files_left": compared["temp_files_left"],
    }


def soak_train_svm(args: argparse.Namespace, work: Path, rng: random.Random, device: torch.device) -> dict:
    """``train-svm`` (fc7 features, box regression) on ``--svm-images`` test images at one
    scale: ``--svm-kills`` SIGKILLs mid-mining at random moments, each restart resuming at the
    last checkpoint; the model the last restart writes must equal the clean run's byte for
    byte. Then :func:`timing_check` on pooled features of the same images."""
    ids, voc = _voc_tree(work, args.svm_images)
    print(f"proposals, extract (1 scale) and a small head for {len(ids)} images ...", flush=True)
    run_to_end(["proposals", *voc, "--workers", "2", "--out", work / "proposals"])
    run_to_end(["extract", *voc, "--proposals", work / "proposals", "--weights", SQUEEZENET_FILE, "--scales", "688",
                "--device", str(device), "--out", work / "feat"])
    run_to_end(["finetune", "--cache", work / "feat", "--fc-dim", "256", "--iterations", "100", "--device", str(device),
                "--out", work / "head"])

    def train(out: Path) -> list:
        return ["train-svm", "--cache", work / "feat", "--head", work / "head", "--features", "fc7", "--bbox",
                "--C", "0.1", "--device", str(device), "--out", out]

    def train_pool(out: Path) -> list:
        return ["train-svm", "--cache", work / "feat", "--features", "pool", "--C", "0.1", "--device", str(device),
                "--out", out]

    print("uninterrupted train-svm ...", flush=True)
    seconds, mining_start = _timed_mining_start(train(work / "reference"), work / "logs", "reference")
    # kills spread over the mining pass: each restart mines ~0.8 / (kills + 1) of it on average
    max_delay = 1.6 * (seconds - mining_start) / (args.svm_kills + 1)
    print(f"{seconds:.1f} s, mining from {mining_start:.1f} s: kills within {max_delay:.2f} s of each mining start", flush=True)
    result = soak_mining(train(work / "soaked"), work / "soaked", args.svm_kills, max_delay, len(ids), rng, work / "logs")
    compared = compare_folders(work / "reference", work / "soaked")
    print("timing check (pool features, a kill at 60% of the clean time) ...", flush=True)
    timing = timing_check(train_pool, work, len(ids))
    return {
        "images": len(ids),
        "scales": "688",
        "reference_seconds": round(seconds, 1),
        "reference_mining_start_s": round(mining_start, 2),
        **result,
        **compared,
        "timing": timing,
    }


#: Stage name -> soak function.
SOAKS: dict[str, Callable[[argparse.Namespace, Path, random.Random, torch.device], dict]] = {
    "extract": soak_extract,
    "train-svm": soak_train_svm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=sorted(SOAKS), action="append", help="stage(s) to soak [default: all]")
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--scales", default="480,576,688,864,1200")
    parser.add_argument("--svm-images", type=int, default=24, help="images of the train-svm soak")
    parser.add_argument("--svm-kills", type=int, default=5, help="kills of the train-svm soak")
    parser.add_argument("--seed", type=int, default=0)
    add_device_option(parser)
    parser.add_argument("--json", type=Path, default=None)
    args = smoke_args(parser, images=2, kills=1, scales="240", svm_images=2, svm_kills=1)

    device = resolve_device(args.device)

    payload: dict[str, object] = {"machine": machine(), "device": str(device), "device_given": args.device, "seed": args.seed}
    ok = True
    for stage in args.stage or sorted(SOAKS):
        with tempfile.TemporaryDirectory(prefix=f"soak-{stage}-") as tmp:
            result = SOAKS[stage](args, Path(tmp), random.Random(args.seed), device)
        payload[stage] = result
        if stage == "train-svm":  # bench/results/soak.json merges runs: the machine each stage's figures come from
            payload["machine_train_svm"] = machine()
        ok &= bool(result["equal"]) and not result["temp_files_left"]
        mining = []
        if "timing" in result:  # train-svm: resumed mining
            timing = result["timing"]
            ok &= bool(result["resumed_at_checkpoint"]) and bool(timing["equal"]) and not timing["temp_files_left"]
            mining = [
                ("images re-mined by each restart", " ".join(map(str, result["remined_per_restart"]))
                 + f" (a checkpoint every {result['checkpoint_every_images']} image(s) or 60 s)"),
                ("each restart resumed at the checkpoint", "yes" if result["resumed_at_checkpoint"] else "NO"),
                ("timing: clean / rerun after a kill at 60%", f"{timing['clean_seconds']} s / {timing['rerun_seconds']} s "
                 f"(rerun_over_clean {timing['rerun_over_clean']}, {timing['checkpointed_at_kill']} images checkpointed; "
                 f"equal: {'yes' if timing['equal'] else 'NO'})"),
            ]
        print_table(
            [
                ("images", str(result["images"])),
                ("kills (SIGKILL)", str(result["kills"])),
                ("restarts", f"{result['restarts']} ({result['finished_early']} ended before their kill)"),
                ("images done after each kill", " ".join(map(str, result["done_after_each_kill"]))),
                ("temp files seen after kills", str(result["temp_files_seen_after_kills"])),
                ("temp files left at the end", str(len(result["temp_files_left"]))),
                ("files identical to the clean run", f"{result['identical_files']} (differing: {len(result['differing_files'])}, missing: {len(result['missing_files'])})"),
                ("cache equal to the clean run", "yes" if result["equal"] else "NO"),
                ("time: clean run / soak", f"{result['reference_seconds']} s / {result['soak_seconds']} s"),
                *mining,
            ],
            f"soak: {stage}",
        )
    write_json(args.json, payload)
    if not ok:
        raise SystemExit("soak: the interrupted run's output differs from the clean run's")


if __name__ == "__main__":
    main()
