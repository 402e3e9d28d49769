"""Image in, conv maps out: the helpers every stage that runs a trunk shares (extract,
classification, retrieval, predict).

Reading an image as RGB pixels, resizing it so its shorter side is a scale (bilinear
without antialiasing, as the SPP-net release did "to better match OpenCV's bilinear",
``spp_features_convX.m``), preparing a trunk for inference, and running it once per scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from spp_detect.backbones import Normalization
from spp_detect.head import PRECISIONS
from spp_detect.images import read_image

__all__ = ["load_image_rgb", "resize_shorter_side", "prepare_trunk", "conv_maps"]


def load_image_rgb(path: Path | str, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """``np.ndarray[H, W, 3]`` uint8 RGB, the stored pixels (EXIF orientation ignored; grey
    images replicated to 3 channels), read through :func:`spp_detect.images.read_image`.

    Args:
        expected_size: ``(width, height)`` from the annotation, checked if given.

    Raises:
        ImageReadError: missing, empty, truncated or undecodable file, or another size.
    """
    return np.ascontiguousarray(read_image(path, expected_size)[:, :, ::-1])


def resize_shorter_side(image: np.ndarray, scale: int) -> np.ndarray:
    """Resize ``np.ndarray[H, W, 3]`` so ``min(H, W) == scale``, bilinear, no antialiasing.

    The other side becomes ``round(side * scale / min(H, W))``; e.g. 500 x 375 at 688
    gives 917 x 688.
    """
    height, width = image.shape[:2]
    factor = scale / min(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


#: The trunk's arithmetic per ``precision`` (``extract --precision``): bfloat16 weights and
#: activations (the conv sums in float32) run the conv layers ~2x faster on CPUs with
#: AVX512-BF16 or AMX (SqueezeNet at 688: 92 vs 182 ms here) and on GPU tensor cores.
TRUNK_DTYPES: dict[str, torch.dtype] = dict(zip(PRECISIONS, (torch.float32, torch.bfloat16), strict=True))


def prepare_trunk(trunk: nn.Module, device: torch.device, precision: str = "fp32") -> nn.Module:
    """Move a trunk to ``device`` in channels-last layout and ``precision``'s dtype
    (:data:`TRUNK_DTYPES`), in eval mode (for :func:`conv_maps`)."""
    if precision not in TRUNK_DTYPES:
        raise ValueError(f"precision must be one of {tuple(TRUNK_DTYPES)}, got {precision!r}")
    return trunk.to(device=device, dtype=TRUNK_DTYPES[precision], memory_format=torch.channels_last).eval()


@torch.inference_mode()
def conv_maps(
    trunk: nn.Module, norm: Normalization, image: np.ndarray, scales: Sequence[int], device: torch.device
) -> list[Tensor]:
    """Run ``trunk`` once per scale on ``np.ndarray[H, W, 3]`` uint8 RGB.

    Returns:
        One ``Tensor[C, h_s, w_s]`` float32 per scale, on ``device`` (a bfloat16 trunk's
        maps converted).

    The input runs in channels-last layout, which roughly halves the CPU conv time of a
    channels-last trunk (:func:`prepare_trunk`) and changes no value beyond float rounding;
    it is normalised in float32 and then cast to the trunk's dtype.
    """
    dtype = next(trunk.parameters()).dtype
    maps = []
    for scale in scales:
        pixels = torch.from_numpy(resize_shorter_side(image, scale)).to(device).permute(2, 0, 1)  # [3, h, w]
        batch = norm(pixels).unsqueeze(0).to(dtype).contiguous(memory_format=torch.channels_last)
        maps.append(trunk(batch)[0].float().contiguous())  # [C, h', w'], C-order for pooling and the cache
    return maps
