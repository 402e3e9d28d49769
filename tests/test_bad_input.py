"""The reliability matrix (issue 12): bad input, interrupted runs and stale outputs.

Every case ends in one of three ways, and the test says which:

* ``error``: a non-zero exit with a one-line ``Error: ...`` naming the file and the
  reason, no traceback, and nothing already written damaged;
* ``skip``: with ``--skip-bad``, the run finishes, the summary counts the entry as bad
  and lists it, the other images are done;
* ``ok``: an unusual but valid input is read by the documented rule (stored pixels,
  EXIF ignored) and the stage finishes.

Fixtures are copies of real VOC2007 images in ``tmp_path`` (never in the repository).
Proposals run with ``--max-pixels 20000`` and extract with one small scale, to keep the
matrix fast; the code paths are those of full-size runs.

Adding a stage to the kill/rerun matrix takes one :class:`StageRun` entry in
:data:`STAGE_RUNS` (its command line and the output files to compare).
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cli
from proposals.io import save_mat
from spp_detect.cache import cached_file_problem
from spp_detect.images import read_image
from spp_detect.stage_dir import check_file
from tests.conftest import MOBILENET_FILE, SQUEEZENET_FILE, VOC_ROOT

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_IDS = (VOC_ROOT / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()
BAD, GOOD = TEST_IDS[0], TEST_IDS[1]  # the bad entry is listed first: a run meets it at once
SMALL = ["--max-pixels", "20000"]  # proposals: search a 0.02 MP copy (fast)
SCALE = ["--scales", "64"]  # extract: one small scale


# --------------------------------------------------------------------------- helpers
def make_voc(root: Path, ids: list[str]) -> Path:
    """A VOCdevkit tree under ``root`` holding copies of real VOC2007 test images."""
    year = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (year / sub).mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        shutil.copy(VOC_ROOT / "VOC2007" / "Annotations" / f"{image_id}.xml", year / "Annotations")
        shutil.copy(VOC_ROOT / "VOC2007" / "JPEGImages" / f"{image_id}.jpg", year / "JPEGImages")
    (year / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def jpg(root: Path, image_id: str) -> Path:
    return root / "VOC2007" / "JPEGImages" / f"{image_id}.jpg"


def xml(root: Path, image_id: str) -> Path:
    return root / "VOC2007" / "Annotations" / f"{image_id}.xml"


def edit_xml(root: Path, image_id: str, edit: Callable[[ET.Element], None]) -> None:
    tree = ET.parse(xml(root, image_id))
    edit(tree.getroot())
    tree.write(xml(root, image_id))


def set_size(root: Path, image_id: str, width: int, height: int, scale_boxes: float | None = None) -> None:
    def edit(r: ET.Element) -> None:
        r.find("size/width").text, r.find("size/height").text = str(width), str(height)
        for bb in r.iter("bndbox"):
            for k in ("xmin", "ymin", "xmax", "ymax"):
                v = float(bb.findtext(k))
                bb.find(k).text = str(max(1, int(v * scale_boxes))) if scale_boxes else str(int(min(v, width if k[0] == "x" else height)))

    edit_xml(root, image_id, edit)


def boxes_mat(path: Path, ids: list[str], boxes: np.ndarray | None = None) -> Path:
    """An R-CNN-style proposals .mat with the same few boxes for every image."""
    boxes = np.array([[0, 0, 16, 16], [1, 1, 12, 12]], np.float32) if boxes is None else boxes
    return save_mat(path, {i: boxes for i in ids})


def invoke(args: list[str]):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def assert_one_line_error(result, *needles: str, code: int = 1) -> str:
    """Exit ``code``, no traceback, and a last line ``Error: ...`` holding every needle."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # click's exit, not a crash
    assert "Traceback" not in result.output
    line = result.output.rstrip("\n").splitlines()[-1]
    assert line.startswith("Error: "), result.output
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def assert_skipped(result, image_id: str, reason: str) -> None:
    assert result.exit_code == 0, result.output
    assert "1 bad" in result.output, result.output
    skipped = [line for line in result.output.splitlines() if line.strip().startswith("skipped")]
    assert len(skipped) == 1 and image_id in skipped[0] and reason in skipped[0], result.output


def stage_args(stage: str, root: Path, out: Path, mat: Path | None = None) -> list:
    voc = ["--voc-root", root, "--image-set", "test"]
    if stage == "proposals":
        return ["-q", "proposals", *voc, "--workers", "1", *SMALL, "--out", out]
    return ["-q", "extract", *voc, "--proposals", mat, "--weights", SQUEEZENET_FILE, *SCALE, "--out", out]


def outputs(folder: Path) -> dict[str, bytes]:
    """Every file of a stage folder, by name (temporary files included, so they show up)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- images
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    with Image.open(path) as im:
        im.load()
        im.save(path, quality=95, exif=exif.tobytes())


def _rotated_annotation(root: Path, image_id: str) -> None:
    _exif_rotated(jpg(root, image_id))
    with Image.open(jpg(root, image_id)) as im:
        width, height = im.size
    set_size(root, image_id, height, width)  # annotated on the displayed (rotated) view


def _png(path: Path, alpha: bool) -> None:
    image = cv2.imread(str(path))
    if alpha:
        ramp = np.linspace(0, 255, image.shape[1], dtype=np.uint8)[None].repeat(image.shape[0], 0)
        image = np.dstack([image, ramp])
    ok, data = cv2.imencode(".png", image)
    path.write_bytes(data.tobytes())


def _grey(path: Path) -> None:
    cv2.imwrite(str(path), cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))


def _cmyk(path: Path) -> None:
    with Image.open(path) as im:
        im.convert("CMYK").save(path, quality=95)


def _tiny(root: Path, image_id: str) -> None:
    image = cv2.imread(str(jpg(root, image_id)))
    cv2.imwrite(str(jpg(root, image_id)), cv2.resize(image, (24, 18)))
    set_size(root, image_id, 24, 18, scale_boxes=min(24 / image.shape[1], 18 / image.shape[0]))


def _huge(root: Path, image_id: str) -> None:
    image = cv2.imread(str(jpg(root, image_id)))
    scale = 6000 / image.shape[1]
    big = cv2.resize(image, (6000, 4000))
    cv2.imwrite(str(jpg(root, image_id)), big, [cv2.IMWRITE_JPEG_QUALITY, 50])
    set_size(root, image_id, 6000, 4000, scale_boxes=min(scale, 4000 / image.shape[0]))


#: name -> (how to break image BAD in a VOC tree, expected reason in the error) for
#: files that must be refused (or skipped with --skip-bad).
BAD_IMAGES: dict[str, tuple[Callable[[Path, str], None], str]] = {
    "missing file": (lambda r, i: jpg(r, i).unlink(), "image file not found"),
    "zero-byte file": (lambda r, i: jpg(r, i).write_bytes(b""), "empty file (0 bytes)"),
    "truncated JPEG": (lambda r, i: _truncate(jpg(r, i)), "truncated or corrupt JPEG data"),
    "text under .jpg": (lambda r, i: jpg(r, i).write_text("<html>not found</html>"), "not a JPEG, PNG"),
    "size differs from annotation": (lambda r, i: set_size(r, i, 400, 300), "annotation says 400x300"),
    "EXIF-rotated, annotated rotated": (_rotated_annotation, "matches the EXIF-rotated view"),
}

#: name -> (how to make image BAD unusual but valid, check of the pixels read) for files
#: that must be read by the rule: stored pixels, 3 channels BGR, EXIF ignored.
ODD_IMAGES: dict[str, tuple[Callable[[Path, str], None], Callable[[np.ndarray, np.ndarray], None]]] = {}


def _same(pixels: np.ndarray, original: np.ndarray) -> None:
    np.testing.assert_array_equal(pixels, original)


def _close(pixels: np.ndarray, original: np.ndarray) -> None:
    assert pixels.shape == original.shape and np.abs(pixels.astype(int) - original).mean() < 3


def _grey_check(pixels: np.ndarray, original: np.ndarray) -> None:
    assert pixels.shape == original.shape and (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


ODD_IMAGES.update(
    {
        "PNG data under .jpg": (lambda r, i: _png(jpg(r, i), alpha=False), _same),  # lossless copy of the decoded JPEG
        "PNG with alpha": (lambda r, i: _png(jpg(r, i), alpha=True), _same),  # alpha dropped, colour as stored
        "grayscale JPEG": (lambda r, i: _grey(jpg(r, i)), _grey_check),
        "CMYK JPEG": (lambda r, i: _cmyk(jpg(r, i)), _close),
        "EXIF-rotated, annotated as stored": (lambda r, i: _exif_rotated(jpg(r, i)), _close),
        "smaller than the backbone's input": (_tiny, lambda p, o: p.shape == (18, 24, 3) or pytest.fail(str(p.shape))),
        "6000 x 4000": (_huge, lambda p, o: p.shape == (4000, 6000, 3) or pytest.fail(str(p.shape))),
    }
)


@pytest.mark.parametrize("stage", ["proposals", "extract"])
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_stops_naming_it_or_is_skipped(case: str, stage: str, tmp_path: Path):
    root = make_voc(tmp_path / "voc", [BAD, GOOD])
    mat = boxes_mat(tmp_path / "ss.mat", [BAD, GOOD])
    breaks, reason = BAD_IMAGES[case]
    breaks(root, BAD)
    out = tmp_path / "out"
    result = invoke(stage_args(stage, root, out, mat))
    assert_one_line_error(result, str(jpg(root, BAD)), reason, "--skip-bad")
    assert not list(out.glob(f"{BAD}.*")) if out.exists() else True

    result = invoke([*stage_args(stage, root, out, mat), "--skip-bad"])
    assert_skipped(result, BAD, reason)
    names = {p.name for p in out.iterdir()}
    assert any(n.startswith(GOOD) for n in names) and not any(n.startswith(BAD) for n in names)
    assert not any(n.startswith(".") for n in names)


@pytest.mark.parametrize("case", list(ODD_IMAGES))
def test_unusual_valid_image_is_read_as_stored(case: str, tmp_path: Path, monkeypatch):
    root = make_voc(tmp_path / "voc", [BAD])
    original = cv2.imread(str(jpg(root, BAD)))
    make, check = ODD_IMAGES[case]
    make(root, BAD)
    tree = ET.parse(xml(root, BAD)).getroot()
    size = (int(tree.findtext("size/width")), int(tree.findtext("size/height")))
    pixels = read_image(jpg(root, BAD), size)  # the one reader every stage uses
    assert pixels.dtype == np.uint8 and pixels.shape == (size[1], size[0], 3)
    check(pixels, original)

    searched: list[tuple[int, ...]] = []
    ss = importlib.import_module("proposals.selective_search")  # the package exports a function of that name

    real = ss.selective_search
    monkeypatch.setattr(ss, "selective_search", lambda image, *a, **k: searched.append(image.shape) or real(image, *a, **k))
    result = invoke(stage_args("proposals", root, tmp_path / "props"))
    assert result.exit_code == 0 and "0 bad" in result.output, result.output
    assert searched and searched[0][0] * searched[0][1] <= 20000  # memory bounded by --max-pixels
    boxes = np.load(tmp_path / "props" / f"{BAD}.npy")
    assert (boxes[:, 2] <= size[0]).all() and (boxes[:, 3] <= size[1]).all()  # in stored-pixel frame
    if min(size) > 100:
        assert boxes.max(axis=0)[2] > 0.5 * size[0]  # scaled back to the original pixels

    mat = boxes_mat(tmp_path / "ss.mat", [BAD])
    result = invoke(stage_args("extract", root, tmp_path / "feat", mat))
    assert result.exit_code == 0 and "0 bad" in result.output, result.output
    from spp_detect.cache import FeatureCache

    cached = FeatureCache(tmp_path / "feat").load(BAD)
    assert (cached.width, cached.height) == size
    assert cached.features().shape[0] == len(cached) and bool(cached.features().isfinite().all())


def test_exif_fixture_really_rotates_in_a_viewer(tmp_path: Path):
    path = tmp_path / "x.jpg"
    shutil.copy(jpg(VOC_ROOT, BAD), path)
    _exif_rotated(path)
    stored = read_image(path)
    assert cv2.imread(str(path)).shape == (stored.shape[1], stored.shape[0], 3)  # OpenCV's default applies EXIF


# --------------------------------------------------------------------------- annotations
def _set_first_box(**values: int | str) -> Callable[[Path, str], None]:
    def edit(r: ET.Element) -> None:
        obj = r.find("object")
        for key, value in values.items():
            if key == "name":
                obj.find("name").text = str(value)
            else:
                bb = obj.find("bndbox")
                bb.find(key).text = str(value if not isinstance(value, str) else eval(value, {}, {k: int(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")}))
    return lambda root, image_id: edit_xml(root, image_id, edit)


def _add_missing_id(root: Path, image_id: str) -> None:
    lst = root / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    lst.write_text(f"nosuch\n{lst.read_text()}")


#: name -> (break, the file the message names, reason, the image id it is listed under)
BAD_ANNOTATIONS: dict[str, tuple[Callable[[Path, str], None], str, str, str]] = {
    "malformed XML": (lambda r, i: xml(r, i).write_text("<annotation><size>"), "xml", "malformed VOC annotation", BAD),
    "box outside the image": (_set_first_box(xmax="xmax + 600"), "xml", "lies outside the", BAD),
    "zero-area box": (_set_first_box(xmax="xmin - 1"), "xml", "has zero area", BAD),
    "inverted box": (_set_first_box(xmax="xmin - 10"), "xml", "is inverted", BAD),
    "unknown class": (_set_first_box(name="dragon"), "xml", "unknown class name 'dragon'", BAD),
    "list names a missing id": (_add_missing_id, "nosuch", "annotation file not found", "nosuch"),
}


@pytest.mark.parametrize("stage", ["proposals", "extract"])
@pytest.mark.parametrize("case", list(BAD_ANNOTATIONS))
def test_bad_annotation_stops_naming_it_or_is_skipped(case: str, stage: str, tmp_path: Path):
    root = make_voc(tmp_path / "voc", [BAD, GOOD])
    mat = boxes_mat(tmp_path / "ss.mat", [BAD, GOOD])
    breaks, names, reason, image_id = BAD_ANNOTATIONS[case]
    breaks(root, BAD)
    named = str(xml(root, BAD)) if names == "xml" else names
    out = tmp_path / "out"
    assert_one_line_error(invoke(stage_args(stage, root, out, mat)), named, reason)
    assert_skipped(invoke([*stage_args(stage, root, out, mat), "--skip-bad"]), image_id, reason)
    assert any(p.name.startswith(GOOD) for p in out.iterdir())


@pytest.mark.parametrize("case", ["malformed XML", "box outside the image", "list names a missing id"])
def test_bad_annotation_stops_evaluate(case: str, tmp_path: Path):
    root = make_voc(tmp_path / "voc", [BAD, GOOD])
    breaks, names, reason, _ = BAD_ANNOTATIONS[case]
    breaks(root, BAD)
    (tmp_path / "dets").mkdir()
    result = invoke(["evaluate", "--voc-root", root, "--image-set", "test", "--detections", tmp_path / "dets"])
    assert_one_line_error(result, str(xml(root, BAD)) if names == "xml" else names, reason)


# --------------------------------------------------------------------------- proposals
def _imported(tmp_path: Path, ids: list[str], boxes: dict[str, np.ndarray] | None = None) -> Path:
    """A proposals folder imported from a .mat (no selective search needed)."""
    good = np.array([[0, 0, 16, 16], [1, 1, 12, 12]], np.float32)
    mat = save_mat(tmp_path / "in.mat", {i: (boxes or {}).get(i, good) for i in ids})
    folder = tmp_path / "props"
    assert invoke(["-q", "proposals", "--import", mat, "--out", folder]).exit_code == 0
    return folder


def _overwritten(tmp_path: Path, boxes: list[list[float]]) -> Path:
    """An imported folder whose file for BAD then holds ``boxes`` (as a buggy tool might write)."""
    folder = _imported(tmp_path, [BAD, GOOD])
    np.save(folder / f"{BAD}.npy", np.array(boxes, np.float32))
    return folder


def _nan_mat(tmp_path: Path) -> Path:
    good = np.array([[0, 0, 16, 16]], np.float32)
    return save_mat(tmp_path / "nan.mat", {BAD: np.array([[np.nan, 0, 5, 5]], np.float32), GOOD: good})


def _truncated(tmp_path):
    folder = _imported(tmp_path, [BAD, GOOD])
    _truncate(folder / f"{BAD}.npy")
    return folder


#: name -> (make the --proposals argument, file named, reason)
BAD_PROPOSALS = {
    "missing proposal file": (lambda t: _imported(t, [GOOD]), "props", "has no boxes for"),
    "truncated proposal file": (_truncated, f"{BAD}.npy", "truncated"),
    "NaN boxes": (lambda t: _overwritten(t, [[0, 0, np.nan, 16]]), f"{BAD}.npy", "NaN or infinite coordinates"),
    "inverted boxes": (lambda t: _overwritten(t, [[0, 0, 16, 16], [30, 0, 10, 16]]), f"{BAD}.npy", "inverted (x2 < x1 or y2 < y1)"),
    "NaN boxes in a .mat": (_nan_mat, "nan.mat", "NaN or infinite coordinates"),
}


@pytest.mark.parametrize("case", list(BAD_PROPOSALS))
def test_bad_proposals_stop_extract_naming_them_or_are_skipped(case: str, tmp_path: Path):
    root = make_voc(tmp_path / "voc", [BAD, GOOD])
    make, named, reason = BAD_PROPOSALS[case]
    proposals = make(tmp_path)
    out = tmp_path / "feat"
    assert_one_line_error(invoke(stage_args("extract", root, out, proposals)), named, reason)
    assert_skipped(invoke([*stage_args("extract", root, out, proposals), "--skip-bad"]), BAD, reason)
    assert (out / f"{GOOD}.npz").is_file() and not (out / f"{BAD}.npz").exists()


def test_truncated_proposal_file_is_redone_by_the_proposals_stage(tmp_path: Path):
    root = make_voc(tmp_path / "voc", [BAD, GOOD])
    out = tmp_path / "props"
    assert invoke(stage_args("proposals", root, out)).exit_code == 0
    reference = outputs(out)
    _truncate(out / f"{BAD}.npy")
    assert check_file(out / f"{BAD}.npy") is not None
    result = invoke(stage_args("proposals", root, out))
    assert result.exit_code == 0 and "1 computed, 1 already done" in result.output, result.output
    assert outputs(out) == reference


def test_proposals_of_another_image_set_are_refused_naming_it(tmp_path: Path):
    root = make_voc(tmp_path / "voc", [BAD, GOOD])
    (root / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").write_text(f"{GOOD}\n")
    props = tmp_path / "props"
    result = invoke(["-q", "proposals", "--voc-root", root, "--image-set", "trainval", "--workers", "1", *SMALL, "--out", props])
    assert result.exit_code == 0, result.output
    assert_one_line_error(invoke(stage_args("extract", root, tmp_path / "feat", props)), BAD, "made for image set 'trainval'")


def test_zero_proposals_for_an_image_keep_its_ground_truth_windows(tmp_path: Path):
    root = make_voc(tmp_path / "voc", [BAD])
    props = _imported(tmp_path, [BAD], {BAD: np.zeros((0, 4), np.float32)})
    assert invoke(stage_args("extract", root, tmp_path / "feat", props)).exit_code == 0
    from spp_detect.cache import FeatureCache

    cached = FeatureCache(tmp_path / "feat").load(BAD)
    assert len(cached) > 0 and bool(cached.is_gt.all())


# --------------------------------------------------------------------------- caches
@pytest.fixture(scope="module")
def cache_run(tmp_path_factory) -> tuple[Path, Path, Path, dict[str, bytes]]:
    """(voc root, proposals .mat, reference cache folder, its files) for 2 real images."""
    base = tmp_path_factory.mktemp("cache")
    root = make_voc(base / "voc", [BAD, GOOD])
    mat = boxes_mat(base / "ss.mat", [BAD, GOOD])
    result = invoke(stage_args("extract", root, base / "feat", mat))
    assert result.exit_code == 0, result.output
    return root, mat, base / "feat", outputs(base / "feat")


CHANGED_SETTINGS = {
    "another backbone": (["--backbone", "mobilenet_v2", "--weights", "none"], "backbone: 'squeezenet1_0' -> 'mobilenet_v2'"),
    "other weights": (["--weights", MOBILENET_FILE, "--backbone", "mobilenet_v2"], "weights: 'sha256:"),
    "other scales": (["--scales", "144"], "scales: [64] -> [144]"),
    "other levels": (["--levels", "1,2"], "levels: [1, 2, 3, 6] -> [1, 2]"),
    "another package version": ([], "package_version: "),
}


@pytest.mark.parametrize("case", list(CHANGED_SETTINGS))
def test_cache_of_other_settings_is_refused_naming_them(case: str, cache_run, tmp_path: Path, monkeypatch):
    root, mat, reference, files = cache_run
    out = tmp_path / "feat"
    shutil.copytree(reference, out)
    extra, needle = CHANGED_SETTINGS[case]
    args = stage_args("extract", root, out, mat)
    for option, value in zip(extra[::2], extra[1::2]):
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    if case == "another package version":
        monkeypatch.setattr("spp_detect.stage_dir.__version__", "999.0")
    assert_one_line_error(invoke(args), str(out), needle, "--force")
    assert outputs(out) == files  # untouched
    if case == "other scales":
        result = invoke([*args, "--force"])
        assert result.exit_code == 0 and "2 image(s) computed" in result.output, result.output


@pytest.mark.parametrize("damage", ["cut short", "empty", "another cache's file"])
def test_damaged_cache_file_is_detected_and_redone(damage: str, cache_run, tmp_path: Path):
    root, mat, reference, files = cache_run
    out = tmp_path / "feat"
    shutil.copytree(reference, out)
    victim = out / f"{BAD}.npz"
    if damage == "cut short":
        _truncate(victim)
    elif damage == "empty":
        victim.write_bytes(b"")
    else:  # the same image from a cache of other settings, copied in by hand
        other = tmp_path / "other"
        assert invoke([*stage_args("extract", root, other, mat), "--limit", "1", "--levels", "1,2"]).exit_code == 0
        shutil.copy(other / f"{BAD}.npz", victim)
    assert cached_file_problem(victim, json.loads((out / "manifest.json").read_text())["key"])
    result = invoke(stage_args("extract", root, out, mat))
    assert result.exit_code == 0 and "1 damaged file(s) redone" in result.output, result.output
    assert outputs(out) == files  # byte for byte


class DiskFull:
    """Patch numpy's array writer: the ``fail_at``-th call writes a little, then raises ENOSPC."""

    def __init__(self, monkeypatch, fail_at: int | None) -> None:
        self.calls, self.fail_at = 0, fail_at
        real = np.lib.format.write_array

        def write_array(fp, array, *args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                fp.write(b"\0" * 64)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fp, array, *args, **kwargs)

        monkeypatch.setattr(np.lib.format, "write_array", write_array)


@pytest.mark.parametrize("stage", ["proposals", "extract"])
def test_full_disk_stops_clearly_and_keeps_what_was_written(stage: str, tmp_path: Path, monkeypatch):
    root = make_voc(tmp_path / "voc", [BAD, GOOD])
    mat = boxes_mat(tmp_path / "ss.mat", [BAD, GOOD])
    reference = tmp_path / "reference"
    with monkeypatch.context() as patch:
        counter = DiskFull(patch, None)
        assert invoke([*stage_args(stage, root, reference, mat), "--limit", "1"]).exit_code == 0
        per_image = counter.calls  # numpy array writes per image file
    assert invoke(stage_args(stage, root, reference, mat)).exit_code == 0
    expected = outputs(reference)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        DiskFull(patch, per_image + min(per_image, 2))  # inside the second image's file
        result = invoke(stage_args(stage, root, out, mat))
    suffix = ".npy" if stage == "proposals" else ".npz"
    assert_one_line_error(result, f"cannot write {out / (GOOD + suffix)}", "No space left on device", "rerun")
    first = out / f"{BAD}{suffix}"
    assert check_file(first) is None and first.read_bytes() == expected[first.name]  # still valid
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", first.name])  # no temp file
    assert invoke(stage_args(stage, root, out, mat)).exit_code == 0  # space freed: resume
    assert outputs(out) == expected


def test_temp_files_of_dead_writers_are_removed_and_live_ones_kept(cache_run, tmp_path: Path):
    from spp_detect.stage_dir import _HOST

    root, mat, reference, files = cache_run
    out = tmp_path / "feat"
    shutil.copytree(reference, out)
    dead_pid = subprocess.Popen(["true"])  # a pid that is surely dead once waited for
    dead_pid.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = out / f".{BAD}.tmp-{dead_pid.pid}-{_HOST}-abc123.npz"
        alive = out / f".{GOOD}.tmp-{live.pid}-{_HOST}-def456.npz"
        other_host = out / f".{BAD}.tmp-{dead_pid.pid}-otherhost-ghi789.npz"
        stranger = out / f".{BAD}.k3j2l1.tmp.npz"  # not a name atomic_write gives: not ours to remove
        for path in (dead, alive, other_host, stranger):
            path.write_bytes(b"half a file")
        os.utime(stranger, (time.time() - 3600, time.time() - 3600))
        assert invoke(stage_args("extract", root, out, mat)).exit_code == 0
        assert not dead.exists() and alive.exists()  # a --shard sibling may own it
        assert other_host.exists() and stranger.exists()  # another host's writer may still run (a day)
        os.utime(other_host, (time.time() - 2 * 86400, time.time() - 2 * 86400))
        assert invoke(stage_args("extract", root, out, mat)).exit_code == 0
        assert not other_host.exists() and stranger.exists()
        stranger.unlink()
    finally:
        live.kill()
        live.wait()
    assert invoke(stage_args("extract", root, out, mat)).exit_code == 0
    assert outputs(out) == files


def test_damaged_manifest_is_refused_then_forced(cache_run, tmp_path: Path):
    root, mat, reference, files = cache_run
    out = tmp_path / "feat"
    shutil.copytree(reference, out)
    (out / "manifest.json").write_text('{"stage": "extr')
    assert_one_line_error(invoke(stage_args("extract", root, out, mat)), str(out / "manifest.json"), "is damaged", "--force")
    assert_one_line_error(invoke(["info", out]), "manifest.json", "is damaged")
    assert invoke([*stage_args("extract", root, out, mat), "--force"]).exit_code == 0
    assert outputs(out) == files


def test_info_lists_damaged_cache_files(cache_run, tmp_path: Path):
    out = tmp_path / "feat"
    shutil.copytree(cache_run[2], out)
    _truncate(out / f"{BAD}.npz")
    result = invoke(["info", out])
    assert result.exit_code == 0 and "images: 1" in result.output
    assert f"damaged (rerun extract to redo it): {BAD}.npz" in result.output


# --------------------------------------------------------------------------- runs: SIGKILL + rerun
@dataclass(frozen=True)
class StageRun:
    """One stage in the kill/rerun matrix.

    Attributes:
        name: test id.
        args: the ``spp-detect`` arguments, given ``(voc root, proposals .mat, out folder)``.
        per_image: a glob matching the finished per-image outputs in ``out`` (progress).
        images: how many images the run processes.
    """

    name: str
    args: Callable[[Path, Path, Path, dict[str, Path]], list]
    per_image: str
    images: int = 6


def _finetune_args(out: Path, made: dict[str, Path]) -> list:
    return ["-q", "finetune", "--cache", made["cache"], "--fc-dim", "32", "--iterations", "60", "--round-iterations", "10",
            "--batch-size", "32", "--out", out]


STAGE_RUNS = [
    StageRun("proposals", lambda root, mat, out, made: [*stage_args("proposals", root, out)[:-2], "--max-pixels", "60000", "--out", out], "0*.npy"),
    StageRun("extract", lambda root, mat, out, made: [*stage_args("extract", root, out, mat)[:-4], "--scales", "480", "--out", out], "0*.npz"),
    # finetune: progress is its checkpoint (one per round of 10 iterations); a rerun resumes from it
    StageRun("finetune", lambda root, mat, out, made: _finetune_args(out, made), "checkpoint.npz", images=4),
    # train-svm: one mining pass; a killed run starts over and must end with the same model
    StageRun("train-svm", lambda root, mat, out, made: ["-q", "train-svm", "--cache", made["cache"], "--head", made["head"],
             "--features", "fc7", "--bbox", "--C", "0.1", "--out", out], "svm.npz", images=3),
    StageRun("detect", lambda root, mat, out, made: ["-q", "detect", "--cache", made["cache"], "--svm", made["svm"], "--bbox",
             "--out", out], "0*.npz"),
]


@pytest.fixture(scope="module")
def detector_inputs(run_inputs, tmp_path_factory) -> dict[str, Path]:
    """A 1-scale cache of the 6 run images, a fine-tuned head and SVMs, for the detector stages."""
    root, mat = run_inputs
    base = tmp_path_factory.mktemp("detector")
    made = {"cache": base / "feat", "head": base / "head", "svm": base / "svm"}
    for args in (
        [*stage_args("extract", root, made["cache"], mat)[:-4], "--scales", "480", "--out", made["cache"]],
        _finetune_args(made["head"], made),
        ["-q", "train-svm", "--cache", made["cache"], "--head", made["head"], "--features", "fc7", "--bbox", "--C", "0.1",
         "--out", made["svm"]],
    ):
        result = invoke(args)
        assert result.exit_code == 0, result.output
    return made


def kill_at_random_point(args: list, out: Path, per_image: str, images: int, rng: random.Random) -> int:
    """Run ``spp-detect ARGS`` in a subprocess and SIGKILL its whole process group at a
    random moment: after a random number (0 .. images - 3) of finished images, plus a
    random few milliseconds (often mid-write). Returns how many images were finished."""
    target, delay = rng.randrange(0, images - 2), rng.uniform(0.0, 0.03)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *map(str, args)], cwd=REPO_ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if target == 0 or len(list(out.glob(per_image))) >= target:
            break
        time.sleep(0.005)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return len(list(out.glob(per_image))) if out.exists() else 0


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("runs")
    ids = TEST_IDS[:6]
    return make_voc(base / "voc", ids), boxes_mat(base / "ss.mat", ids, np.array([[0, 0, 100, 80], [50, 40, 200, 300], [10, 10, 60, 60]], np.float32))


@pytest.mark.parametrize("run", STAGE_RUNS, ids=lambda r: r.name)
def test_sigkill_then_rerun_equals_an_uninterrupted_run_byte_for_byte(run: StageRun, run_inputs, request, tmp_path: Path):
    root, mat = run_inputs
    made = request.getfixturevalue("detector_inputs") if run.name in ("finetune", "train-svm", "detect") else {}
    reference = tmp_path / "reference"
    result = invoke(run.args(root, mat, reference, made))
    assert result.exit_code == 0, result.output
    out = tmp_path / "killed"
    finished = kill_at_random_point(run.args(root, mat, out, made), out, run.per_image, run.images, random.Random(run.name))
    assert finished < run.images
    result = invoke(run.args(root, mat, out, made))
    assert result.exit_code == 0, result.output
    assert outputs(out) == outputs(reference)  # same names (no temporary file left), same bytes


# --------------------------------------------------------------------------- CLI option values
def _cli_cases() -> list[tuple[str, list, str]]:
    voc = ["--voc-root", VOC_ROOT]
    ext = ["extract", *voc, "--image-set", "test", "--limit", "1", "--out", "{tmp}/feat"]
    mat = "{tmp}/ss.mat"
    return [
        ("proposals --mode", ["proposals", *voc, "--out", "{tmp}/p", "--mode", "slow"], "--mode"),
        ("proposals --max-boxes", ["proposals", *voc, "--out", "{tmp}/p", "--max-boxes", "0"], "--max-boxes"),
        ("proposals --min-size", ["proposals", *voc, "--out", "{tmp}/p", "--min-size", "-1"], "--min-size"),
        ("proposals --seed", ["proposals", *voc, "--out", "{tmp}/p", "--seed", "x"], "--seed"),
        ("proposals --workers", ["proposals", *voc, "--out", "{tmp}/p", "--workers", "0"], "--workers"),
        ("proposals --limit", ["proposals", *voc, "--out", "{tmp}/p", "--limit", "0"], "--limit"),
        ("proposals --max-pixels", ["proposals", *voc, "--out", "{tmp}/p", "--max-pixels", "5"], "--max-pixels"),
        ("proposals --image-set", ["proposals", *voc, "--image-set", "nosuch", "--out", "{tmp}/p"], "--image-set"),
        ("proposals --voc-root", ["proposals", "--voc-root", "{tmp}/nowhere", "--out", "{tmp}/p"], "--voc-root"),
        ("proposals --out is a file", ["proposals", *voc, "--out", mat], "--out"),
        ("proposals --import", ["proposals", "--import", "{tmp}/none.mat", "--out", "{tmp}/p"], "--import"),
        ("extract --scales text", [*ext, "--proposals", mat, "--scales", "480,x"], "--scales"),
        ("extract --scales zero", [*ext, "--proposals", mat, "--scales", "0"], "--scales"),
        ("extract --scales repeat", [*ext, "--proposals", mat, "--scales", "480,480"], "--scales"),
        ("extract --scales too small", [*ext, "--proposals", mat, "--weights", SQUEEZENET_FILE, "--scales", "16"], "too small for squeezenet1_0"),
        ("extract --levels text", [*ext, "--proposals", mat, "--levels", "1,2,x"], "--levels"),
        ("extract --levels zero", [*ext, "--proposals", mat, "--levels", "0"], "--levels"),
        ("extract --shard", [*ext, "--proposals", mat, "--shard", "3/2"], "--shard"),
        ("extract --shard text", [*ext, "--proposals", mat, "--shard", "a/b"], "--shard"),
        ("extract --device", [*ext, "--proposals", mat, "--device", "tpu"], "--device"),
        ("extract --weights missing", [*ext, "--proposals", mat, "--weights", "{tmp}/no.pth"], "--weights"),
        ("extract --weights not weights", [*ext, "--proposals", mat, "--weights", mat], "--weights"),
        ("extract --weights other net", [*ext, "--proposals", mat, "--weights", MOBILENET_FILE], "does not fit backbone 'squeezenet1_0'"),
        ("extract --backbone", [*ext, "--proposals", mat, "--backbone", "resnet9"], "--backbone"),
        ("extract --input-norm", [*ext, "--proposals", mat, "--input-norm", "x"], "--input-norm"),
        ("extract --proposals", [*ext, "--proposals", "{tmp}/none"], "--proposals"),
        ("extract --image-set", ["extract", *voc, "--image-set", "nosuch", "--proposals", mat, "--out", "{tmp}/f"], "--image-set"),
        ("evaluate --iou-threshold", ["evaluate", *voc, "--detections", "{tmp}", "--iou-threshold", "0"], "--iou-threshold"),
        ("evaluate --metric", ["evaluate", *voc, "--detections", "{tmp}", "--metric", "x"], "--metric"),
        ("evaluate --rule", ["evaluate", *voc, "--detections", "{tmp}", "--rule", "x"], "--rule"),
        ("evaluate --json is a folder", ["evaluate", *voc, "--detections", "{tmp}", "--json", "{tmp}"], "--json"),
        ("evaluate --image-set", ["evaluate", *voc, "--image-set", "nosuch", "--detections", "{tmp}"], "--image-set"),
        ("evaluate --detections", ["evaluate", *voc, "--detections", "{tmp}/none"], "--detections"),
        ("info FOLDER missing", ["info", "{tmp}/none"], "FOLDER"),
        ("info FOLDER not a stage", ["info", "{tmp}"], "not a spp-detect stage folder"),
        ("unknown command", ["detect-everything"], "No such command"),
    ]


@pytest.mark.parametrize("name,args,needle", _cli_cases(), ids=[c[0] for c in _cli_cases()])
def test_bad_option_value_gives_a_usage_error(name: str, args: list, needle: str, tmp_path: Path):
    boxes_mat(tmp_path / "ss.mat", TEST_IDS[:1])
    result = invoke([str(a).format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    line = assert_one_line_error(result, needle, code=2)
    assert len(line) < 400


# --------------------------------------------------------------------------- models given to detect
def test_detect_refuses_a_model_for_other_features_or_classes(detector_inputs, tmp_path: Path):
    import json as _json

    made = detector_inputs
    other_features = tmp_path / "svm-other"
    shutil.copytree(made["svm"], other_features)
    meta = _json.loads((other_features / "svm.json").read_text())
    meta.update(layer="pool", head=None, head_key=None)  # a model of pooled features of another trunk (96 x 50)
    (other_features / "svm.json").write_text(_json.dumps(meta))
    from spp_detect.tensor_io import save_tensors

    save_tensors(other_features / "svm.npz", {"weights": np.zeros((96 * 50, 20), np.float32), "bias": np.zeros(20, np.float32),
                                               "feature_scale": np.float32(1.0)})
    result = invoke(["detect", "--cache", made["cache"], "--svm", other_features, "--out", tmp_path / "d1"])
    assert_one_line_error(result, "takes 4800-d pooled features", "gives 25600")

    other_classes = tmp_path / "svm-classes"
    shutil.copytree(made["svm"], other_classes)
    meta = _json.loads((other_classes / "svm.json").read_text())
    meta["classes"] = [*meta["classes"][:19], "zebra"]
    (other_classes / "svm.json").write_text(_json.dumps(meta))
    result = invoke(["detect", "--cache", made["cache"], "--svm", other_classes, "--out", tmp_path / "d2"])
    assert_one_line_error(result, "classes differ", "zebra")
