"""Proposals stage: filtering rules, .mat conversion, resume, bad input, CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner

from cli import main
from proposals import (
    BadImageError,
    ProposalSettings,
    filter_boxes,
    load_proposals,
    propose,
    run_proposals,
    save_mat,
    selective_search,
)
from proposals.io import mat_to_xyxy, xyxy_to_mat
from spp_detect.datasets.voc import read_voc
from spp_detect.stage_dir import SettingsChanged, config_key, file_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 4


# --------------------------------------------------------------------------- helpers
def make_voc(root: Path, source: Path, ids: list[str], corrupt: tuple[str, ...] = ()) -> Path:
    """A VOCdevkit-like tree in ``root`` with copies of real VOC2007 images (test time only)."""
    year = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (year / sub).mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        shutil.copy(source / "VOC2007" / "Annotations" / f"{image_id}.xml", year / "Annotations")
        jpeg = year / "JPEGImages" / f"{image_id}.jpg"
        if image_id in corrupt:
            jpeg.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG " * 40)
        else:
            shutil.copy(source / "VOC2007" / "JPEGImages" / f"{image_id}.jpg", jpeg)
    (year / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def first_test_ids(voc_root: Path, n: int) -> list[str]:
    return (voc_root / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()[:n]




def assert_same_folder(a: Path, b: Path) -> None:
    pa, pb = load_proposals(a), load_proposals(b)
    assert list(pa) == list(pb)
    for image_id in pa:
        np.testing.assert_array_equal(pa[image_id], pb[image_id])


@pytest.fixture(scope="module")
def small_voc(voc_root: Path, tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"), voc_root, first_test_ids(voc_root, NUM_IMAGES))


@pytest.fixture(scope="module")
def fresh_run(small_voc: Path, tmp_path_factory) -> Path:
    """One uninterrupted run (1 worker, in process) on the small tree."""
    out = tmp_path_factory.mktemp("fresh") / "props"
    images = read_voc(small_voc, "test")
    summary = run_proposals(images, out, ProposalSettings(), {"year": "2007", "image_set": "test"}, workers=1)
    assert summary.done == NUM_IMAGES and not summary.bad
    return out


# --------------------------------------------------------------------------- filter_boxes
def test_filter_boxes_clips_then_drops_small_keeps_order():
    boxes = np.array(
        [
            [-5, -5, 30, 30],  # clipped to (0, 0, 30, 30): kept
            [0, 0, 19.5, 40],  # width 19.5 < 20: dropped
            [0, 0, 40, 19.9],  # height 19.9 < 20: dropped
            [10, 10, 30, 30],  # exactly 20 x 20: kept (R-CNN keeps width >= 20)
            [90, 10, 130, 50],  # clipped to (90, 10, 100, 50), width 10: dropped
            [5, 5, 60, 45],  # kept
        ],
        dtype=np.float32,
    )
    out = filter_boxes(boxes, width=100, height=80, min_size=20, max_boxes=10)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[0, 0, 30, 30], [10, 10, 30, 30], [5, 5, 60, 45]])


def test_filter_boxes_removes_duplicates_keeping_first_and_caps():
    boxes = np.array(
        [[50, 0, 90, 40], [0, 0, 40, 40], [50, 0, 90, 40], [-10, 0, 40, 40], [10, 10, 50, 50], [0, 0, 40, 40]],
        dtype=np.float32,
    )
    out = filter_boxes(boxes, width=100, height=100, min_size=20, max_boxes=None)
    # duplicates (also the one that only becomes a duplicate after clipping) go; ranks kept
    np.testing.assert_array_equal(out, [[50, 0, 90, 40], [0, 0, 40, 40], [10, 10, 50, 50]])
    np.testing.assert_array_equal(filter_boxes(boxes, 100, 100, 20, max_boxes=2), out[:2])


def test_filter_boxes_empty_in_empty_out():
    out = filter_boxes(np.zeros((0, 4), np.float32), 10, 10)
    assert out.shape == (0, 4) and out.dtype == np.float32
    # everything too small: an empty [0, 4], not an error
    assert filter_boxes(np.array([[0, 0, 5, 5]], np.float32), 10, 10, min_size=20).shape == (0, 4)
    with pytest.raises(ValueError, match="image size"):
        filter_boxes(np.zeros((0, 4)), 0, 10)


# --------------------------------------------------------------------------- selective_search
def synthetic_image(width: int = 96, height: int = 72) -> np.ndarray:
    image = np.full((height, width, 3), (40, 160, 40), np.uint8)
    cv2.rectangle(image, (10, 12), (50, 60), (20, 20, 220), thickness=-1)
    cv2.circle(image, (75, 30), 14, (230, 200, 10), thickness=-1)
    return image


@pytest.mark.parametrize("mode", ["fast", "opencv-fast", "opencv-quality"])
def test_selective_search_boxes_are_xyxy_in_image_and_seeded(mode: str):
    image = synthetic_image()
    boxes = selective_search(image, mode)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 0
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 72).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert [0, 0, 96, 72] in boxes.tolist()  # the last merge covers the whole image
    # the red rectangle's pixels 10..50 x 12..60 are the continuous box (10, 12, 51, 61)
    assert [10, 12, 51, 61] in boxes.tolist()
    np.testing.assert_array_equal(selective_search(image, mode), boxes)  # same seed, same ranking
    again = selective_search(image, mode, seed=7)
    assert sorted(map(tuple, again.tolist())) == sorted(map(tuple, boxes.tolist()))


def test_propose_on_tiny_image_gives_empty_result():
    out = propose(synthetic_image(16, 12), "fast", min_size=20, max_boxes=2000)
    assert out.shape == (0, 4) and out.dtype == np.float32


def test_selective_search_rejects_bad_input():
    with pytest.raises(ValueError, match="BGR image"):
        selective_search(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="unknown mode"):
        selective_search(synthetic_image(), "slow")


# --------------------------------------------------------------------------- .mat files
def test_mat_round_trip_hand_built(tmp_path: Path):
    # R-CNN layout: images = cell of ids, boxes = cell of [N, 4] doubles, 1-based (y1, x1, y2, x2)
    raw = {
        "000001": np.array([[1, 1, 10, 20], [5, 7, 375, 500]], dtype=np.float64),
        "000002": np.zeros((0, 4), dtype=np.float64),
        "000003": np.array([[2, 3, 4, 5]], dtype=np.float64),
    }
    images = np.empty(3, dtype=object)
    boxes = np.empty(3, dtype=object)
    for i, (image_id, b) in enumerate(raw.items()):
        images[i], boxes[i] = image_id, b
    src = tmp_path / "voc_2007_test.mat"
    scipy.io.savemat(src, {"images": images, "boxes": boxes})

    loaded = load_proposals(src)
    assert list(loaded) == ["000001", "000002", "000003"]
    # (y1, x1, y2, x2) = (1, 1, 10, 20) covers 1-based pixels x 1..20, y 1..10: [0, 20) x [0, 10)
    np.testing.assert_array_equal(loaded["000001"], [[0, 0, 20, 10], [6, 4, 500, 375]])
    assert loaded["000002"].shape == (0, 4) and loaded["000002"].dtype == np.float32
    np.testing.assert_array_equal(loaded["000003"], [[2, 1, 5, 4]])

    back = tmp_path / "back.mat"
    save_mat(back, loaded)
    data = scipy.io.loadmat(back)
    assert [str(x[0]) for x in data["images"].ravel()] == list(raw)
    for got, want in zip(data["boxes"].ravel(), raw.values()):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got.reshape(-1, 4), want)
    # the same proposals again leave the file (and so its SHA-256, a cache's key) as it is;
    # other proposals replace it
    digest = file_sha256(back)
    time.sleep(1.1)  # the .mat header's time stamp has a resolution of seconds
    save_mat(back, dict(loaded))
    assert file_sha256(back) == digest
    save_mat(back, {**loaded, "000003": np.array([[2, 1, 6, 4]], np.float32)})
    assert file_sha256(back) != digest and load_proposals(back)["000003"].tolist() == [[2, 1, 6, 4]]


def test_mat_conversion_is_exact_inverse():
    boxes = np.array([[0, 0, 500, 375], [12.0, 3.0, 40.0, 90.0]], dtype=np.float32)
    np.testing.assert_array_equal(xyxy_to_mat(boxes), [[1, 1, 375, 500], [4, 13, 90, 40]])
    np.testing.assert_array_equal(mat_to_xyxy(xyxy_to_mat(boxes)), boxes)


def test_mat_with_char_matrix_ids_and_bad_files(tmp_path: Path):
    boxes = np.empty(2, dtype=object)
    boxes[0], boxes[1] = np.array([[1.0, 1, 30, 30]]), np.array([[2.0, 2, 9, 9]])
    path = tmp_path / "chars.mat"
    scipy.io.savemat(path, {"images": np.array(["000005", "000007"]), "boxes": boxes})  # char matrix
    assert list(load_proposals(path)) == ["000005", "000007"]
    with pytest.raises(KeyError, match="000009"):
        load_proposals(path, image_ids=["000005", "000009"])
    scipy.io.savemat(tmp_path / "nobox.mat", {"images": np.array(["000005"])})
    with pytest.raises(ValueError, match="'boxes'"):
        load_proposals(tmp_path / "nobox.mat")


# --------------------------------------------------------------------------- the stage
def test_resume_after_kill_equals_uninterrupted_run(small_voc: Path, fresh_run: Path, tmp_path: Path):
    out = tmp_path / "props"
    cmd = [sys.executable, "-m", "cli", "-q", "proposals", "--voc-root", str(small_voc), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    finished: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        finished = [p for p in out.glob("*.npy") if not p.name.startswith(".")]
        if finished:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert 1 <= len(finished) < NUM_IMAGES
    (out / ".000001.stale.tmp.npy").write_bytes(b"half a file")  # as a kill mid-write leaves

    result = CliRunner().invoke(main, ["-q", "proposals", "--voc-root", str(small_voc), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "already done" in result.output
    assert_same_folder(out, fresh_run)


def test_changed_setting_is_refused_naming_it(small_voc: Path, fresh_run: Path, tmp_path: Path):
    out = tmp_path / "props"
    shutil.copytree(fresh_run, out)
    runner = CliRunner()
    args = ["-q", "proposals", "--voc-root", str(small_voc), "--out", str(out), "--workers", "1"]
    result = runner.invoke(main, args + ["--min-size", "30"])
    assert result.exit_code == 1
    assert "min_size: 20 -> 30" in result.output and "--force" in result.output
    assert_same_folder(out, fresh_run)  # untouched
    # same settings: everything is reused
    result = runner.invoke(main, args)
    assert result.exit_code == 0 and f"0 computed, {NUM_IMAGES} already done" in result.output
    with pytest.raises(SettingsChanged, match="max_boxes"):
        run_proposals(read_voc(small_voc, "test"), out, ProposalSettings(max_boxes=5), {"year": "2007", "image_set": "test"})


def test_folder_of_the_old_opencv_order_engine_is_refused(small_voc: Path, fresh_run: Path, tmp_path: Path):
    # a folder written before the paper's ranking had no "engine" in its manifest
    out = tmp_path / "props"
    shutil.copytree(fresh_run, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"].pop("engine").startswith("grouping-v1")
    manifest["key"] = config_key(manifest["config"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SettingsChanged, match="engine"):
        run_proposals(read_voc(small_voc, "test"), out, ProposalSettings(), {"year": "2007", "image_set": "test"})


def test_corrupt_jpeg_stops_or_is_skipped(voc_root: Path, tmp_path: Path):
    ids = first_test_ids(voc_root, 2)
    root = make_voc(tmp_path / "voc", voc_root, ids, corrupt=(ids[0],))
    bad_path = root / "VOC2007" / "JPEGImages" / f"{ids[0]}.jpg"
    out = tmp_path / "props"
    runner = CliRunner()
    args = ["-q", "proposals", "--voc-root", str(root), "--out", str(out), "--workers", "1"]

    result = runner.invoke(main, args)
    assert result.exit_code == 1
    assert f"unreadable image {bad_path}" in result.output and "--skip-bad" in result.output
    assert not (out / f"{ids[0]}.npy").exists()

    with pytest.raises(BadImageError) as info:
        run_proposals(read_voc(root, "test"), out, ProposalSettings(), {"year": "2007", "image_set": "test"}, workers=1)
    assert info.value.path == bad_path and info.value.image_id == ids[0]

    result = runner.invoke(main, args + ["--skip-bad", "--export-mat", str(tmp_path / "p.mat")])
    assert result.exit_code == 0, result.output
    assert "1 bad" in result.output
    assert not (out / f"{ids[0]}.npy").exists() and (out / f"{ids[1]}.npy").is_file()
    assert list(load_proposals(tmp_path / "p.mat")) == [ids[1]]


def test_image_without_boxes_gets_empty_entry(voc_root: Path, tmp_path: Path):
    root = make_voc(tmp_path / "voc", voc_root, [])
    year = root / "VOC2007"
    cv2.imwrite(str(year / "JPEGImages" / "tiny.jpg"), synthetic_image(16, 12))
    (year / "Annotations" / "tiny.xml").write_text(
        "<annotation><size><width>16</width><height>12</height><depth>3</depth></size></annotation>"
    )
    (year / "ImageSets" / "Main" / "test.txt").write_text("tiny\n")
    out = tmp_path / "props"
    summary = run_proposals(read_voc(root, "test"), out, ProposalSettings(), {}, workers=1)
    assert summary.done == 1 and summary.boxes_per_image == 0
    boxes = load_proposals(out)["tiny"]
    assert boxes.shape == (0, 4) and boxes.dtype == np.float32


def test_cli_export_then_import_round_trip(fresh_run: Path, tmp_path: Path):
    runner = CliRunner()
    mat = tmp_path / "props.mat"
    result = runner.invoke(main, ["-q", "proposals", "--out", str(fresh_run), "--export-mat", str(mat)])
    assert result.exit_code == 0, result.output
    imported = tmp_path / "imported"
    result = runner.invoke(main, ["-q", "proposals", "--import", str(mat), "--out", str(imported)])
    assert result.exit_code == 0, result.output
    assert_same_folder(imported, fresh_run)

    result = runner.invoke(main, ["proposals", "--import", str(mat), "--out", str(imported), "--min-size", "5"])
    assert result.exit_code == 2 and "--min-size" in result.output
    result = runner.invoke(main, ["proposals", "--out", str(imported)], env={"SPP_DETECT_VOC_ROOT": None})
    assert result.exit_code == 2 and "--voc-root" in result.output
