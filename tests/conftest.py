"""Shared fixtures: the real data on disk in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the repo; SPP_DETECT_SHARED_DATA overrides it (worktrees elsewhere).
SHARED_DATA = Path(os.environ.get("SPP_DETECT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
VOC_ROOT = SHARED_DATA / "voc2007-mini"
WEIGHTS_DIR = SHARED_DATA / "weights"
SQUEEZENET_FILE = WEIGHTS_DIR / "squeezenet1_0-imagenet-deepcompression.pth"
MOBILENET_FILE = WEIGHTS_DIR / "mobilenet_v2-imagenet1001-coral.pth"


@pytest.fixture(scope="session")
def voc_root() -> Path:
    """The genuine VOC2007 slice (200 trainval + 200 test images)."""
    if not (VOC_ROOT / "VOC2007" / "ImageSets" / "Main" / "test.txt").is_file():
        raise RuntimeError(f"test data missing: expected VOC2007 under {VOC_ROOT}")
    return VOC_ROOT


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    """Folder with the two ImageNet-pretrained state_dicts."""
    if not SQUEEZENET_FILE.is_file():
        raise RuntimeError(f"test weights missing: expected {SQUEEZENET_FILE}")
    return WEIGHTS_DIR


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a shared 2-core machine, two OpenMP threads wait on each other whenever other jobs
    take a core, which makes small convs ~100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def jittered_proposals(images, count: int = 30, seed: int | None = 0, copies: int = 6) -> dict:
    """Windows for tests: ``count`` random ones per image plus ``copies`` jittered copies of
    each ground-truth box (so there are positives), ``np.ndarray[M, 4]`` float32 0-based xyxy
    by image id. One generator seeded ``seed`` for all images, or with ``seed=None`` one per
    image seeded by its id (the same windows for an image whatever the others)."""
    import numpy as np

    rng = np.random.default_rng(seed) if seed is not None else None
    out = {}
    for im in images:
        gen = rng if rng is not None else np.random.default_rng(int(im.image_id))
        size = np.array([im.width, im.height], dtype=np.float64)
        xy = gen.uniform(0, 1, (count, 2)) * (size - 20)
        wh = 20 + gen.uniform(0, 1, (count, 2)) * (size - 20 - xy)
        boxes = [np.concatenate([xy, xy + wh], axis=1)]
        for box in im.boxes:
            w, h = box[2] - box[0], box[3] - box[1]
            jitter = gen.uniform(-0.08, 0.08, (copies, 4)) * np.array([w, h, w, h])
            boxes.append(np.clip(box + jitter, 0, np.concatenate([size, size]) - 1))
        out[im.image_id] = np.concatenate(boxes).astype(np.float32)
    return out


def proposals_mat(boxes: dict, folder) -> "Path":
    """``boxes`` (image id -> ``np.ndarray[M, 4]`` 0-based xyxy, e.g. :func:`jittered_proposals`)
    written as an R-CNN selective-search ``.mat`` in ``folder``: the proposals input
    ``run_extract`` reads (its SHA-256 keys the cache), as ``extract --proposals file.mat``."""
    from pathlib import Path

    from proposals.io import save_mat

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return save_mat(folder / "proposals.mat", boxes)
