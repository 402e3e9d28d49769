"""Every benchmark runs: ``python -m bench.<name> --smoke`` (a few images, seconds) for each
module in bench/, so that a benchmark that breaks fails the suite; and ``bench.combine``
gives the files the command line gives for the same inputs. Every smoke run spells its device
``cpu:0`` (the same device as ``cpu``, :func:`spp_detect.device.resolve_device`), and every
benchmark takes ``--device`` through that one rule (checked statically)."""

from __future__ import annotations

import ast
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from spp_detect.stage_dir import read_manifest
from tests.conftest import REPO_ROOT

BENCHES = sorted(p.stem for p in (REPO_ROOT / "bench").glob("*.py") if p.stem not in ("__init__", "common"))
_RUNS: dict[str, Path] = {}
#: benchmarks without ``--device``, and why: they run nothing on a torch device
NO_DEVICE = {
    "eval": "evaluation alone: numpy and pycocotools, no torch",
    "proposals": "selective search, a CPU stage (the proposals command has no --device); its torch calls are "
                 "box arithmetic on CPU tensors inside proposals/, which take no device",
}


def _smoke(name: str, tmp_path_factory) -> Path:
    """Run ``bench.<name> --smoke`` once per session in its own folder (its temporary work
    folders go there too); returns the folder, holding ``result.json``."""
    if name not in _RUNS:
        folder = tmp_path_factory.mktemp(f"bench-{name}")
        args = [sys.executable, "-m", f"bench.{name}", "--smoke", "--json", str(folder / "result.json")]
        env = _env(folder)
        if name == "combine":
            args += ["--work", str(folder / "work")]
        if name not in NO_DEVICE:  # another spelling of cpu: the same results
            args += ["--device", "cpu:0"]
        if name == "gpu":  # as on a GPU machine: a folder made by --prepare, ../shared/data absent
            prepare = [sys.executable, "-m", "bench.gpu", "--smoke", "--prepare", str(folder / "data")]
            done = subprocess.run(prepare, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"bench.gpu --prepare failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            args += ["--data", str(folder / "data")]
            env = {**env, "SPP_DETECT_SHARED_DATA": str(folder / "no-shared-data")}
        done = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"bench.{name} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        _RUNS[name] = folder
    return _RUNS[name]


def _env(tmp: Path) -> dict[str, str]:
    """One thread (float sums in one order: the same bytes in two processes), temporary files in ``tmp``."""
    return {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}


def _cli(tmp: Path, *args: str) -> None:
    """``spp-detect ARGS`` in a process like the benchmark's."""
    done = subprocess.run([sys.executable, "-m", "cli", "-q", *args], cwd=REPO_ROOT, env=_env(tmp), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def _is_args_device(node: ast.AST) -> bool:
    """``args.device`` (or ``<...>.args.device``)."""
    if not (isinstance(node, ast.Attribute) and node.attr == "device"):
        return False
    value = node.value
    return (isinstance(value, ast.Name) and value.id == "args") or (isinstance(value, ast.Attribute) and value.attr == "args")


def _calls(node: ast.AST, name: str) -> bool:
    """Whether ``node`` is a call of ``name`` (``name(...)`` or ``<module>.name(...)``)."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Name) and func.id == name) or (isinstance(func, ast.Attribute) and func.attr == name)


def _device_uses(tree: ast.AST) -> tuple[list[int], list[int]]:
    """Lines of the ``args.device`` reads allowed (the argument of ``resolve_device(...)``, or
    the value recorded as ``device_given``: a dict entry, a ``device_given=`` keyword or a
    ``[..."device_given"] =`` assignment) and of those that are not."""
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if _calls(node, "resolve_device"):
            allowed |= {id(a) for a in [*node.args, *(k.value for k in node.keywords)] if _is_args_device(a)}
        elif isinstance(node, ast.Dict):
            allowed |= {id(v) for k, v in zip(node.keys, node.values)
                        if isinstance(k, ast.Constant) and k.value == "device_given" and _is_args_device(v)}
        elif isinstance(node, ast.Call):
            allowed |= {id(k.value) for k in node.keywords if k.arg == "device_given" and _is_args_device(k.value)}
        elif isinstance(node, ast.Assign) and _is_args_device(node.value):
            if all(isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant) and t.slice.value == "device_given"
                   for t in node.targets):
                allowed.add(id(node.value))
    good, bad = [], []
    for node in ast.walk(tree):
        if _is_args_device(node):
            (good if id(node) in allowed else bad).append(node.lineno)
    return good, bad


def test_every_benchmark_takes_device_through_the_one_rule():
    """Issue 28: every benchmark's ``--device`` comes from :func:`bench.common.add_device_option`
    and is read only as the argument of :func:`spp_detect.device.resolve_device` (or recorded as
    ``device_given``), so that every spelling of one device gives the same results; those
    without the option are listed in :data:`NO_DEVICE`, with their reason."""
    assert set(NO_DEVICE) <= set(BENCHES)
    problems = []
    for name in BENCHES:
        source = (REPO_ROOT / "bench" / f"{name}.py").read_text()
        tree = ast.parse(source)
        option = any(_calls(node, "add_device_option") for node in ast.walk(tree))
        own = [node.lineno for node in ast.walk(tree) if _calls(node, "add_argument") and node.args
               and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--device"]
        good, bad = _device_uses(tree)
        if name in NO_DEVICE:
            if option or good or bad or own:
                problems.append(f"{name}: listed in NO_DEVICE ({NO_DEVICE[name]}) but it has a --device")
            continue
        if not option:
            problems.append(f"{name}: no add_device_option(parser)")
        if own:
            problems.append(f"{name}: its own --device add_argument, lines {own}")
        if not any(_calls(node, "resolve_device") for node in ast.walk(tree)):
            problems.append(f"{name}: never calls resolve_device")
        if bad:
            problems.append(f"{name}: args.device used other than through resolve_device, lines {bad}")
    assert not problems, "\n".join(problems)


def test_every_bench_module_is_covered():
    assert {"combine", "detect_speed", "redetect", "eval", "extract", "gpu"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_bench_smoke_runs_and_writes_its_json(name, tmp_path_factory):
    folder = _smoke(name, tmp_path_factory)
    result = json.loads((folder / "result.json").read_text())
    assert isinstance(result, dict) and result


#: the committed result each benchmark's README figures come from (bench/results/)
RESULT_FILES = {name: f"{name}.json" for name in BENCHES if (REPO_ROOT / "bench" / "results" / f"{name}.json").is_file()}
RESULT_FILES["proposals"] = "proposals-fast.json"
#: keys of a committed result that a --smoke run does not write, and why
FULL_RUN_ONLY: dict[str, set[str]] = {
    # part 2 (training an SPP classifier, --trained-backbone) runs only in the full benchmark
    "classification": {"trained", "trained_backbone", "trained_epochs", "trained_info", "trained_seconds"},
    # notes and figures merged into the committed result by hand from earlier runs (README says which)
    "detection": {"columns_svm_tol_0.1", "columns_svm_tol_0.1_note", "not_run", "not_run_this_wave",
                  "pair_50_test_images", "stage_seconds_5scale_extract_from_file_times",
                  "stage_seconds_from_file_times", "train_svm_peak_mb_note"},
}


@pytest.mark.parametrize("name", sorted(RESULT_FILES))
def test_bench_smoke_json_has_the_keys_of_its_committed_result(name, tmp_path_factory):
    """The JSON keys the README's figures are read from (the committed result's top-level keys)
    are written by the benchmark as it is now, so a renamed or dropped key fails here."""
    committed = json.loads((REPO_ROOT / "bench" / "results" / RESULT_FILES[name]).read_text())
    smoke = json.loads((_smoke(name, tmp_path_factory) / "result.json").read_text())
    missing = set(committed) - set(smoke) - FULL_RUN_ONLY.get(name, set())
    assert not missing, f"bench.{name} --smoke no longer writes {sorted(missing)}"


def test_bench_gpu_smoke_reports_what_the_readme_names(tmp_path_factory):
    """The keys README's "On a GPU" section names; on the CPU, ``cpu:0`` against ``cpu``
    differs nowhere, and the shares come from the stages' own timings."""
    result = json.loads((_smoke("gpu", tmp_path_factory) / "result.json").read_text())
    assert result["errors"] == {} and result["device_given"] == "cpu:0" and result["device"] == "cpu"
    rates = result["images_per_second"]
    assert sorted(rates) == ["detect_1scale", "detect_5scale", "extract_1scale", "extract_5scale"]
    assert all(rate > 0 for rate in rates.values())
    shares = result["cpu_wait_share"]
    assert sorted(shares) == sorted([*rates, "finetune", "train_svm"])
    assert all(0 <= shares[k] <= 1 for k in rates) and shares["finetune"] is None and shares["train_svm"] is None
    assert set(result["target"]) == {"detect_5scale_images_per_second", "met"}
    for mode in ("tf32_on", "tf32_off"):
        diffs = result["differences"][mode]
        assert all(diffs[k]["max_abs"] == 0 and diffs[k]["ref_max_abs"] > 0 for k in ("maps", "pooled", "fc7", "scores"))
        assert diffs["detections"]["matched_share"] == 1 and diffs["detections"]["max_abs_score"] == 0
    assert all(result["stages"][k]["images"] == result["images"] == 3 for k in rates)


def test_bench_combine_gives_the_files_of_the_command_line(tmp_path_factory, tmp_path):
    folder = _smoke("combine", tmp_path_factory)
    result = json.loads((folder / "result.json").read_text())
    work, row = folder / "work", result["row"]
    dets = [work / name for name in result["combined_inputs"]]  # in the bench's order
    caches = {read_manifest(p)["key"]: p for p in work.glob("feat-*")}
    assert len(dets) == 2 and sorted(dets) == sorted(work.glob("dets-*"))
    for folder in dets:  # calibrate as the CLI does, into a fresh folder: the same files as the bench's
        svm = Path(json.loads((folder / "detections_info.json").read_text())["svm"])
        train = [caches[key] for key in read_manifest(svm)["config"]["caches"]]
        assert len(train) == 2  # the two training lists, given together
        out = tmp_path / f"calib-{folder.name}"
        _cli(tmp_path, "calibrate", *[x for c in train for x in ("--cache", str(c))], "--svm", str(svm),
             *(["--bbox"] if row == "ftfc7 bb" else []), "--out", str(out))
        for name in ("calibration.npz", "calibration.json"):
            assert filecmp.cmp(out / name, svm / "calibration" / name, shallow=False), name
    for scores in ("raw", "calibrated"):
        out = tmp_path / f"combined-{scores}"
        _cli(tmp_path, "combine", *[x for d in dets for x in ("--detections", str(d))], "--scores", scores, "--out", str(out))
        (bench_folder,) = work.glob(f"combined-{scores}-*")
        files = sorted(p.name for p in bench_folder.iterdir())
        assert files == sorted(p.name for p in out.iterdir()) and "manifest.json" in files and "detections.json" in files
        assert all(filecmp.cmp(bench_folder / f, out / f, shallow=False) for f in files)
