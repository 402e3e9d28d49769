"""Scale-out: shards from the launcher's environment, one stage folder filled by several
processes, and data-parallel fine-tuning, launched for real with ``torchrun`` on CPU (gloo).

The launched commands run this worktree's code: ``cwd`` is the repository root and
``PYTHONPATH`` points at it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from proposals.io import save_mat
from spp_detect.cache import FeatureCache
from spp_detect.datasets import read_voc
from spp_detect.distributed import Launch, launch_from_env, parse_shard, resolve_shard
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.finetune import (FinetuneSettings, _draw_round, _dropout_masks, _pool_rows, collect_training_windows,
                                 run_finetune)
from spp_detect.head import load_head
from spp_detect.stage_dir import SettingsChanged, open_stage_dir
from spp_detect.window_features import open_caches
from tests.conftest import SQUEEZENET_FILE, proposals_mat

REPO = Path(cli.__file__).resolve().parent
SCALES = "240,336"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cli", *args]


# --------------------------------------------------------------------------- the environment
def test_launch_from_torchrun_slurm_or_nothing():
    assert launch_from_env({}) == Launch(0, 1, 0, "none")
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert launch_from_env(torchrun) == Launch(5, 8, 1, "torchrun")
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}
    assert launch_from_env(slurm) == Launch(3, 4, 1, "slurm")
    assert launch_from_env({**slurm, "SLURM_STEP_NUM_TASKS": "6"}).world_size == 6  # the step's count wins
    assert launch_from_env({**slurm, **torchrun}).launcher == "torchrun"  # torchrun inside a SLURM job
    with pytest.raises(ValueError, match="rank 4 of 4"):
        launch_from_env({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"})
    with pytest.raises(ValueError, match="not an integer"):
        launch_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    assert resolve_shard("auto", Launch(5, 8, 1, "torchrun")) == (6, 8)
    assert resolve_shard("auto", Launch()) == (1, 1)
    assert resolve_shard("2/3", Launch(5, 8, 1, "torchrun")) == (2, 3)  # explicit K/N wins
    assert parse_shard("AUTO") is None
    for bad in ("0/2", "3/2", "1", "a/b"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_concurrent_openers_create_one_manifest_and_all_check_it(tmp_path):
    folder = tmp_path / "stage"
    start, results, errors = threading.Barrier(8), [], []

    def opener(cfg):
        start.wait()
        try:
            results.append(open_stage_dir(folder, "extract", cfg)["key"])
        except SettingsChanged as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=opener, args=({"a": 1} if i % 4 else {"a": 2},)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # whichever config won the race, the other one is refused with the usual message, naming "a"
    assert len(results) in (2, 6) and len(set(results)) == 1 and len(errors) == 8 - len(results)
    assert all("other settings (a: " in e for e in errors)
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]  # no temporary file left
    with pytest.raises(SettingsChanged):  # a follower given --force waits for shard 1, then gives up
        open_stage_dir(folder, "extract", {"a": 3}, force=True, leader=False, wait_s=0.3)
    assert json.loads((folder / "manifest.json").read_text())["config"]["a"] != 3


# --------------------------------------------------------------------------- extract under torchrun
@pytest.fixture(scope="module")
def voc6(voc_root, tmp_path_factory):
    """A VOC tree of 6 real test images (linked) and R-CNN-style proposals for them."""
    tmp = tmp_path_factory.mktemp("voc6")
    ids = [im.image_id for im in read_voc(voc_root, "test")[:6]]
    root = tmp / "voc" / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for sub in ("JPEGImages", "Annotations"):
        (root / sub).symlink_to(voc_root / "VOC2007" / sub)
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    images = read_voc(tmp / "voc", "test")
    rng = np.random.default_rng(0)
    proposals = {}
    for im in images:
        size = np.array([im.width, im.height], dtype=np.float64)
        xy = rng.uniform(0, 1, (150, 2)) * (size - 20)
        wh = 20 + rng.uniform(0, 1, (150, 2)) * (size - 20 - xy)
        proposals[im.image_id] = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    mat = save_mat(tmp / "ss.mat", proposals)
    single = tmp / "single"  # the reference: one process (this one)
    settings = ExtractSettings(weights=str(SQUEEZENET_FILE), scales=tuple(int(s) for s in SCALES.split(",")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers (OMP_NUM_THREADS=1): the conv sums in the same order
    try:
        run_extract(images, mat, single, settings, image_set="test", device=torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    return tmp / "voc", mat, ids, single


def _extract_args(voc, mat, out) -> list[str]:
    return ["extract", "--voc-root", str(voc), "--image-set", "test", "--proposals", str(mat),
            "--weights", str(SQUEEZENET_FILE), "--scales", SCALES, "--device", "cpu", "--out", str(out)]


def _assert_same_cache(got: Path, want: Path, ids: list[str]) -> None:
    a, b = FeatureCache(got), FeatureCache(want)
    assert a.image_ids == b.image_ids == sorted(ids)
    assert a.key == b.key
    for image_id in ids:
        x, y = a.load(image_id), b.load(image_id)
        assert torch.equal(x.boxes, y.boxes) and torch.equal(x.cells, y.cells)
        assert torch.equal(x.scale_index, y.scale_index) and torch.equal(x.gt_labels, y.gt_labels)
        assert all(torch.equal(m, n) for m, n in zip(x.maps, y.maps))
        assert torch.equal(x.features(), y.features())


def test_torchrun_extract_equals_one_process(voc6, tmp_path):
    voc, mat, ids, single = voc6
    out = tmp_path / "two"
    run = subprocess.run(_torchrun(*_extract_args(voc, mat, out)), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for k in (1, 2):  # one summary line per process, naming its shard
        assert f"extract [shard {k}/2 (torchrun rank {k - 1})]: 3 image(s) computed, 0 already cached" in run.stdout
    _assert_same_cache(out, single, ids)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_killed_worker_then_rerun_of_the_job_gives_the_same_cache(voc6, tmp_path):
    voc, mat, ids, single = voc6
    out = tmp_path / "killed"
    log = tmp_path / "torchrun.log"
    with open(log, "w") as fh:
        job = subprocess.Popen(_torchrun(*_extract_args(voc, mat, out)), cwd=REPO, env=_env(), stdout=fh, stderr=fh)
    deadline, workers = time.time() + 600, []  # generous: start-up is slow on a loaded machine
    while time.time() < deadline and job.poll() is None and not list(out.glob("0*.npz")):
        time.sleep(0.01)
    workers = _children(job.pid)
    assert len(workers) == 2, f"expected two workers of torchrun, found {workers}; torchrun said:\n{log.read_text()[-3000:]}"
    os.kill(workers[0], signal.SIGKILL)  # one worker dies; torchrun then stops the other and fails
    assert job.wait(timeout=120) != 0
    done_before = sorted(p.stem for p in out.glob("0*.npz"))
    assert 1 <= len(done_before) < len(ids), "the job was not interrupted mid-way"

    rerun = subprocess.run(_torchrun(*_extract_args(voc, mat, out)), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    skipped = [int(line.split(" already cached")[0].rsplit(" ", 1)[1]) for line in rerun.stdout.splitlines()
               if line.startswith("extract [shard")]
    assert len(skipped) == 2 and sum(skipped) == len(done_before)  # each shard skipped what was there
    _assert_same_cache(out, single, ids)


# --------------------------------------------------------------------------- finetune under torchrun
FT = FinetuneSettings(fc_dim=32, iterations=6, base_lr=0.01, lr_steps=(4,), batch_size=16, round_iterations=3, seed=3)


@pytest.fixture(scope="module")
def train_cache(voc_root, tmp_path_factory):
    images = read_voc(voc_root, "trainval")[:4]
    rng = np.random.default_rng(1)
    proposals = {}
    for im in images:  # jittered ground truth (foreground) plus random windows (background)
        size = np.array([im.width, im.height] * 2, dtype=np.float64)
        jitter = [np.clip(b + rng.uniform(-0.3, 0.3, (8, 4)) * np.tile(b[2:] - b[:2], 2), 0, size - 1) for b in im.boxes]
        proposals[im.image_id] = np.concatenate(jitter).astype(np.float32)
    out = tmp_path_factory.mktemp("ft") / "cache"
    settings = ExtractSettings(weights=str(SQUEEZENET_FILE), scales=(240, 336))
    run_extract(images, proposals_mat(proposals, Path(f"{out}-proposals")), out, settings, image_set="x",
                device=torch.device("cpu"))
    return out


def test_each_rank_gets_its_rows_of_the_global_minibatch_and_its_dropout_masks(train_cache):
    caches = open_caches([train_cache])
    windows = collect_training_windows(caches)
    cpu = torch.device("cpu")
    feats, labels = _pool_rows(caches, windows, _draw_round(caches, windows, FT, 0, 3), cpu).rows(slice(None))
    for rank in (0, 1):
        part, part_labels = _pool_rows(caches, windows, _draw_round(caches, windows, FT, 0, 3, rank=rank, world_size=2),
                                       cpu).rows(slice(None))
        rows = (np.arange(3)[:, None] * 16 + np.arange(rank, 16, 2)).ravel()
        assert torch.equal(part, feats[rows]) and torch.equal(part_labels, labels[rows])
        masks = _dropout_masks(FT, 7, cpu, rank, 2)
        assert torch.equal(masks, _dropout_masks(FT, 7, cpu, 0, 1)[:, rank::2])
    assert set(_dropout_masks(FT, 7, cpu, 0, 1).unique().tolist()) == {0.0, 2.0}  # p = 0.5, scaled by 2


def _finetune_args(cache, out, *extra) -> list[str]:
    return ["finetune", "--cache", str(cache), "--out", str(out), "--fc-dim", "32", "--iterations", "6", "--lr", "0.01",
            "--lr-steps", "4", "--batch-size", "16", "--round-iterations", "3", "--seed", "3", "--device", "cpu", *extra]


def test_torchrun_finetune_equals_one_process_at_the_same_batch(train_cache, tmp_path):
    one = tmp_path / "one"
    run_finetune([train_cache], one, FT)  # one process, 16 windows per minibatch
    two = tmp_path / "two"  # two processes of 8 windows each, stopped after a round and resumed
    for extra in (("--stop-after", "3"), ()):
        run = subprocess.run(_torchrun(*_finetune_args(train_cache, two, *extra)), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed at 3" in run.stdout and "on 2 processes" in run.stdout
    assert run.stdout.count("finetune:") == 1  # rank 0 reports for the job
    # Same minibatches, same dropout masks; only the order of float sums differs (the
    # gradient is two half-batch sums all-reduced instead of one sum), so after 6 SGD
    # steps weights and logged losses agree to float32 rounding: rtol 1e-4, atol 1e-6.
    a, b = load_head(one).state_dict(), load_head(two).state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name
    assert not torch.allclose(a["fc8.bias"], torch.ones(21), atol=1e-3)  # it trained (fc8 bias starts at 1)
    log_one = json.loads((one / "train_log.json").read_text())
    log_two = json.loads((two / "train_log.json").read_text())
    assert [r["iteration"] for r in log_two] == [3, 6]
    for x, y in zip(log_one, log_two):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["fg_accuracy"] == y["fg_accuracy"]


# --------------------------------------------------------------------------- detect and train-svm
def test_detect_shards_write_their_images_and_the_last_one_the_result_files(train_cache, voc6, tmp_path, monkeypatch):
    from click.testing import CliRunner

    _, _, ids, test_cache = voc6
    runner = CliRunner()
    svm = tmp_path / "svm"
    r = runner.invoke(cli.main, ["-q", "train-svm", "--cache", str(train_cache), "--features", "pool", "--C", "0.1",
                                 "--device", "cpu", "--out", str(svm)])
    assert r.exit_code == 0, r.output
    detect = ["-q", "detect", "--cache", str(test_cache), "--svm", str(svm), "--device", "cpu", "--score-threshold", "-5"]
    whole = tmp_path / "whole"
    assert runner.invoke(cli.main, [*detect, "--out", str(whole)]).exit_code == 0

    sharded = tmp_path / "sharded"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # the second process finishes first: it leaves the result files
    r = runner.invoke(cli.main, [*detect, "--out", str(sharded)])
    assert r.exit_code == 0, r.output
    assert "detect [shard 2/2 (torchrun rank 1)]: 3 image(s) computed" in r.output and "3 image(s) left to other shards" in r.output
    assert sorted(p.stem for p in sharded.glob("0*.npz")) == ids[1::2] and not list(sharded.glob("*.txt"))
    monkeypatch.setenv("RANK", "0")
    r = runner.invoke(cli.main, [*detect, "--out", str(sharded)])
    assert r.exit_code == 0, r.output
    assert "detect [shard 1/2 (torchrun rank 0)]: 3 image(s) computed" in r.output and "comp4_det_test_*.txt" in r.output
    files = sorted(p.name for p in whole.iterdir() if p.suffix in (".txt", ".json") and p.name != "manifest.json")
    assert files and files == sorted(p.name for p in sharded.iterdir() if p.suffix in (".txt", ".json") and p.name != "manifest.json")
    for name in files:
        assert (whole / name).read_bytes() == (sharded / name).read_bytes(), name

    r = runner.invoke(cli.main, ["train-svm", "--cache", str(train_cache), "--features", "pool", "--out", str(tmp_path / "s2")])
    assert r.exit_code != 0 and "train-svm runs in one process" in r.output and "torchrun started 2" in r.output


def test_proposals_shard_takes_every_nth_image_into_the_shared_folder(voc6, tmp_path):
    from proposals.run import ProposalSettings, run_proposals

    voc, _, ids, _ = voc6
    images = read_voc(voc, "test")[:4]
    out = tmp_path / "ss"
    summary = run_proposals(images, out, ProposalSettings(max_boxes=50), workers=1, shard=(4, 4))
    assert summary.describe().startswith(f"shard 4/4: 1 images -> {out}: 1 computed, 0 already done")
    assert [p.stem for p in out.glob("0*.npy")] == [ids[3]]
