"""train-svm resumes where it was killed (issue 30 item 2): its mining state is checkpointed
(a small ``mining-state.npz`` plus an append-only row log), a rerun continues at the image
after the last checkpoint, and the model it writes is byte for byte an uninterrupted run's.
Real features: a 1-scale SqueezeNet cache of 5 VOC2007 trainval images."""

from __future__ import annotations

from pathlib import Path
import numpy as np
import pytest
import torch

import svm.train as train
from spp_detect.datasets import read_voc
from spp_detect.extract import ExtractSettings, run_extract
from svm.train import MINING_STATE, SVMSettings, run_train_svm
from tests.conftest import SQUEEZENET_FILE, jittered_proposals, proposals_mat

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = 5
SETTINGS = SVMSettings(layer="pool", C=0.1, bbox=True)
MODEL_FILES = ("svm.npz", "svm.json", "bbox.npz")


@pytest.fixture(scope="module")
def cache(voc_root, tmp_path_factory):
    images = read_voc(voc_root, "trainval")[:IMAGES]
    out = tmp_path_factory.mktemp("feat") / "train"
    settings = ExtractSettings(backbone="squeezenet1_0", weights=str(SQUEEZENET_FILE), scales=(240,))
    run_extract(images, proposals_mat(jittered_proposals(images), Path(f"{out}-proposals")), out, settings, image_set="x",
                device=torch.device("cpu"))
    return out


#: retrained every few windows: warm starts and evictions between checkpoints
OFTEN = SVMSettings(layer="pool", C=0.1, bbox=True, retrain_limit=10)
_REFERENCES: dict[SVMSettings, tuple] = {}


def _reference(cache, tmp_path_factory, settings=SETTINGS):
    """An uninterrupted run: its model files' bytes, and what it left in its folder."""
    if settings not in _REFERENCES:
        out = tmp_path_factory.mktemp("svm") / "reference"
        summary = run_train_svm([cache], out, settings)
        assert summary.resumed_from is None and summary.images_mined == summary.images == IMAGES
        assert "resumed" not in summary.describe(out)
        _REFERENCES[settings] = ({name: (out / name).read_bytes() for name in MODEL_FILES}, sorted(p.name for p in out.iterdir()))
    return _REFERENCES[settings]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    return _reference(cache, tmp_path_factory)


class Killed(Exception):
    """What the test hook raises: the run stops as a SIGKILL would stop it (no clean-up)."""


def _kill_after(monkeypatch, images: int) -> None:
    def hook(done: int) -> None:
        if done == images:
            raise Killed(done)

    monkeypatch.setattr(train, "_after_image", hook)


def _killed_run(cache, out, monkeypatch, after: int, settings=SETTINGS) -> dict:
    """A run killed after mining ``after`` images; returns its checkpoint's state."""
    _kill_after(monkeypatch, after)
    with pytest.raises(Killed):
        run_train_svm([cache], out, settings)
    monkeypatch.setattr(train, "_after_image", None)
    assert not (out / "svm.npz").exists() and (out / MINING_STATE).is_file() and (out / train.BBOX_SCRATCH).is_dir()
    with np.load(out / MINING_STATE) as state:
        return {k: state[k] for k in state.files}


def _rerun(cache, out, settings=SETTINGS):
    seen: dict[str, int] = {}

    def progress(items, *, desc, total=None, initial=0):  # the stages' progress protocol
        assert total == IMAGES
        seen[desc] = len(items)
        return items

    summary = run_train_svm([cache], out, settings, progress=progress)
    return summary, seen


def _assert_same_model_and_clean(out, reference) -> None:
    files, names = reference
    for name in MODEL_FILES:
        assert (out / name).read_bytes() == files[name], name
    assert sorted(p.name for p in out.iterdir()) == names  # the checkpoint files are gone
    assert not list(out.glob("mining-*")) and not (out / train.BBOX_SCRATCH).exists()


def test_uninterrupted_run_leaves_only_the_model(reference):
    _, names = reference
    assert names == sorted(["manifest.json", *MODEL_FILES])


@pytest.mark.parametrize("after,share,slack,often,resumed", [
    (2, 0.05, 2.0, False, 2),  # a checkpoint after every image (5% of 5 images rounds up to 1)
    (2, 0.5, 2.0, False, 0),  # every 3 images: killed before the first, it resumes after pass 1 (positives)
    (4, 0.05, 0.5, False, 4),  # the row log rewritten (compacted) at every checkpoint after the first
    (3, 0.05, 2.0, True, 3),  # retrained between checkpoints: warm starts, evictions
])
def test_killed_mid_mining_resumes_at_the_checkpoint_to_the_same_bytes(cache, tmp_path_factory, tmp_path, monkeypatch,
                                                                      after, share, slack, often, resumed):
    settings = OFTEN if often else SETTINGS
    reference = _reference(cache, tmp_path_factory, settings)
    monkeypatch.setattr(train, "CHECKPOINT_SHARE", share)
    monkeypatch.setattr(train, "LOG_SLACK", slack)
    out = tmp_path / "svm"
    state = _killed_run(cache, out, monkeypatch, after, settings)
    assert int(state["images_done"]) == resumed
    logs = list(out.glob("mining-rows-*.bin"))
    assert [p.name for p in logs] == [f"mining-rows-{int(state['log_generation'])}.bin"]
    assert logs[0].stat().st_size == int(state["log_records"]) * (8 + 2 * int(state["dim"]))
    if slack < 1:
        assert int(state["log_generation"]) == after  # rewritten at each image's checkpoint (pass 1's appends)
        assert int(state["log_records"]) == len(np.unique(np.concatenate([state["neg_keys"], -1 - np.arange(
            int(state["pos_counts"].sum()))])))  # the live rows only
    if often:
        assert state["retrains"].max() >= 2 and state["neg_alphas"].any()  # mid-mining retrainings were checkpointed
    summary, seen = _rerun(cache, out, settings)
    assert summary.resumed_from == resumed and summary.images_mined == IMAGES - resumed
    assert "positives" not in seen and seen["mining"] == IMAGES - resumed  # pass 1 and mined images not redone
    assert f"resumed after {resumed} images" in summary.describe(out)
    _assert_same_model_and_clean(out, reference)


def test_log_bytes_past_the_recorded_length_are_ignored(cache, reference, tmp_path, monkeypatch):
    out = tmp_path / "svm"
    state = _killed_run(cache, out, monkeypatch, 3)
    log_path = out / f"mining-rows-{int(state['log_generation'])}.bin"
    with open(log_path, "ab") as fh:  # a checkpoint killed while appending: half a record of garbage
        fh.write(np.random.default_rng(0).bytes(8 + int(state["dim"])))
    summary, seen = _rerun(cache, out)
    assert summary.resumed_from == 3 and seen["mining"] == IMAGES - 3
    _assert_same_model_and_clean(out, reference)


def test_a_log_cut_short_or_a_damaged_state_starts_mining_over(cache, reference, tmp_path, monkeypatch, caplog):
    out = tmp_path / "svm"
    state = _killed_run(cache, out, monkeypatch, 3)
    log_path = out / f"mining-rows-{int(state['log_generation'])}.bin"
    with open(log_path, "r+b") as fh:
        fh.truncate(log_path.stat().st_size - 1)
    summary, seen = _rerun(cache, out)
    assert summary.resumed_from is None and seen == {"positives": IMAGES, "mining": IMAGES}
    assert "cannot resume" in caplog.text
    _assert_same_model_and_clean(out, reference)

    out = tmp_path / "svm2"
    _killed_run(cache, out, monkeypatch, 2)
    (out / MINING_STATE).write_bytes(b"not a zip")
    summary, _ = _rerun(cache, out)
    assert summary.resumed_from is None
    _assert_same_model_and_clean(out, reference)


def test_a_run_killed_after_its_model_cleans_up_on_the_rerun(cache, reference, tmp_path, monkeypatch):
    out = tmp_path / "svm"
    _killed_run(cache, out, monkeypatch, 2)
    files, _ = reference
    for name in MODEL_FILES:  # as if killed between writing svm.npz and removing the checkpoint
        (out / name).write_bytes(files[name])
    summary = run_train_svm([cache], out, SETTINGS)
    assert summary.already_done
    _assert_same_model_and_clean(out, reference)
