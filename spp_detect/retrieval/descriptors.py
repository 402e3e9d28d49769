"""MAC and R-MAC descriptors of one conv map (Tolias et al., ICLR 2016, section 3;
the released ``mac_act.m`` / ``rmac_regionvec_act.m`` / ``test.m``, docs/sources.md 5.1).

* The map is the backbone's last conv map of the full-resolution image with ReLU applied
  (docs/sources.md 5.1: ``max(x, 0)``; MobileNetV2's linear bottleneck output has negatives).
* MAC: per-channel max over the whole map.
* Region vectors: the MAC of each R-MAC region (:mod:`~spp_detect.retrieval.regions`),
  L2-normalised. R-MAC = L2(sum of L2(whiten(region vector))); without whitening, the
  whitening step is skipped (L2, sum, L2).

Region maxima use ``torchvision.ops.roi_pool`` with one bin, which on integer cell boxes
is the exact max over the box's cells (``tests/test_retrieval_descriptors.py`` checks it
against a loop).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_pool

from spp_detect.retrieval.regions import LEVELS, rmac_regions
from spp_detect.retrieval.whitening import Whitening, apply_whitening, l2_normalize

__all__ = ["mac", "region_macs", "region_vectors", "rmac_from_regions", "crop_query"]


def mac(maps: Tensor) -> np.ndarray:
    """Per-channel max of ``Tensor[C, H, W]`` -> ``np.ndarray[C]`` float32 (not normalised)."""
    return maps.flatten(1).amax(1).float().cpu().numpy()


def region_macs(maps: Tensor, regions: np.ndarray) -> np.ndarray:
    """Max of ``Tensor[C, H, W]`` over each half-open cell region ``np.ndarray[R, 4]``.

    Returns:
        ``np.ndarray[R, C]`` float32.
    """
    if len(regions) == 0:
        return np.zeros((0, maps.shape[0]), dtype=np.float32)
    cells = torch.as_tensor(regions, dtype=torch.float32, device=maps.device)
    cells = torch.cat([cells[:, :2], cells[:, 2:] - 1], dim=1)  # inclusive ends for roi_pool
    rois = torch.cat([torch.zeros((len(cells), 1), device=maps.device), cells], dim=1)
    pooled = roi_pool(maps[None].float(), rois, output_size=(1, 1), spatial_scale=1.0)  # [R, C, 1, 1]
    return pooled.flatten(1).cpu().numpy()


def region_vectors(maps: Tensor, levels: int = LEVELS) -> np.ndarray:
    """L2-normalised MACs of the R-MAC regions of ``Tensor[C, H, W]`` -> ``np.ndarray[R, C]``."""
    return l2_normalize(region_macs(maps, rmac_regions(maps.shape[1], maps.shape[2], levels)))


def rmac_from_regions(vectors: np.ndarray, whitening: Whitening | None) -> np.ndarray:
    """Aggregate L2-normalised region vectors ``np.ndarray[R, C]`` into one R-MAC ``[D]``:
    (whiten + L2 per region when ``whitening`` is given), sum, L2."""
    if whitening is not None:
        vectors = apply_whitening(vectors, whitening)
    return l2_normalize(np.asarray(vectors, dtype=np.float32).sum(0))


def crop_query(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Crop ``np.ndarray[H, W, 3]`` to a query box, as the release's ``crop_qim.m``.

    Args:
        box: ``(x1, y1, x2, y2)`` as written in Oxford/Paris ``_query.txt`` files, i.e.
            0-based pixel coordinates whose ends are inclusive.

    The release keeps rows ``round(y1 + 1) .. min(round(y2 + 1), H)`` (1-based, MATLAB
    rounds half away from zero), i.e. 0-based ``[round(y1), min(round(y2) + 1, H))``; the
    same for columns.

    Raises:
        ValueError: the box leaves no pixel.
    """
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (int(np.floor(max(v, 0.0) + 0.5)) for v in box)  # MATLAB round, non-negative
    crop = image[y1 : min(y2 + 1, height), x1 : min(x2 + 1, width)]
    if crop.shape[0] == 0 or crop.shape[1] == 0:
        raise ValueError(f"query box {tuple(box)} is empty inside a {width} x {height} image")
    return crop
