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
