"""Flipped training images (the release fine-tunes on them, docs/sources.md 1.6): boxes mirrored
exactly, and a flipped cache holds the conv maps of the mirrored image with its windows
mapped on them: a flipped window's features are pooled from the mirrored image's own map.

The map of the mirrored image is not the mirror of the image's map for these trunks (the
receptive-field grid is offset, so mirrored windows fall on other cells), which is why the
flip is computed from the image and not from cached maps; the last test pins that."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spp_detect.backbones import build_trunk, get_backbone, resolve_normalization
from spp_detect.boxes import mirror_boxes
from spp_detect.cache import FeatureCache
from spp_detect.datasets import read_voc
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.image_trunk import conv_maps, load_image_rgb, prepare_trunk
from spp_detect.spp import spatial_pyramid_pool
from spp_detect.windows import windows_to_cells
from tests.conftest import SQUEEZENET_FILE, proposals_mat

pytestmark = pytest.mark.usefixtures("one_thread")
SCALE = 240


def test_mirror_boxes_exact_and_involutive():
    boxes = torch.tensor([[0.0, 1.0, 20.0, 30.0], [10.5, 2.0, 500.0, 375.0], [0.0, 0.0, 500.0, 375.0]])
    mirrored = mirror_boxes(boxes, 500)
    assert torch.equal(mirrored, torch.tensor([[480.0, 1.0, 500.0, 30.0], [0.0, 2.0, 489.5, 375.0], [0.0, 0.0, 500.0, 375.0]]))
    assert torch.equal(mirror_boxes(mirrored, 500), boxes)
    assert mirror_boxes(torch.zeros((0, 4)), 500).shape == (0, 4)


def test_flipped_cache_is_the_mirrored_image_with_mirrored_windows(tmp_path, voc_root):
    images = read_voc(voc_root, "test")[:2]
    rng = np.random.default_rng(0)
    proposals = {}
    for im in images:
        xy = rng.uniform(0, 1, (40, 2)) * (np.array([im.width, im.height]) - 30)
        proposals[im.image_id] = np.concatenate([xy, xy + 25 + rng.uniform(0, 60, (40, 2))], 1).clip(
            0, [im.width, im.height, im.width, im.height]).astype(np.float32)
    caches = {}
    for flip in (False, True):
        settings = ExtractSettings(backbone="squeezenet1_0", weights=str(SQUEEZENET_FILE), scales=(SCALE,), flip=flip)
        run_extract(images, proposals_mat(proposals, tmp_path), tmp_path / f"feat-{flip}", settings, image_set="test",
                    device=torch.device("cpu"))
        caches[flip] = FeatureCache(tmp_path / f"feat-{flip}")
    assert caches[True].key != caches[False].key
    spec = get_backbone("squeezenet1_0")
    trunk = prepare_trunk(build_trunk("squeezenet1_0", SQUEEZENET_FILE), torch.device("cpu"))
    norm = resolve_normalization("squeezenet1_0", SQUEEZENET_FILE)
    for im in images:
        plain, flipped = caches[False].load(im.image_id), caches[True].load(im.image_id)
        assert torch.equal(flipped.boxes, mirror_boxes(plain.boxes, im.width))  # ground truth first, then proposals
        assert torch.equal(flipped.gt_labels, plain.gt_labels) and torch.equal(flipped.gt_difficult, plain.gt_difficult)
        mirrored_pixels = np.ascontiguousarray(load_image_rgb(im.path)[:, ::-1])
        fresh = conv_maps(trunk, norm, mirrored_pixels, (SCALE,), torch.device("cpu"))[0]  # [C, h, w]
        assert torch.equal(flipped.maps[0].float(), fresh.half().float())  # [C, h, w], stored as fp16
        factor = torch.full((len(flipped.boxes),), SCALE / min(im.width, im.height))
        sizes = torch.tensor([list(fresh.shape[1:])] * len(flipped.boxes))
        cells = windows_to_cells(flipped.boxes, factor, spec.stride, spec.offset, sizes)
        assert torch.equal(flipped.cells, cells)
        rows = torch.arange(len(flipped.boxes))
        expected = spatial_pyramid_pool(fresh.half().float(), cells, flipped.levels)
        assert torch.allclose(flipped.features(rows, "cpu"), expected, rtol=0, atol=0)
        # not a mirror of the plain map's cells: the grid offset breaks the symmetry
        width = fresh.shape[2]
        plain_cells = plain.cells
        mirrored_cells = torch.stack([width - 1 - plain_cells[:, 2], width - 1 - plain_cells[:, 0]], 1)
        assert not torch.equal(mirrored_cells, flipped.cells[:, [0, 2]])
