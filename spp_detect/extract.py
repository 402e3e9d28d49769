"""The extract stage: conv maps once per image per scale, windows assigned and mapped.

For each image (SPP-net 4.1): resize so the shorter side is each scale ``s`` (bilinear
without antialiasing, as the release did "to better match OpenCV's bilinear",
spp_features_convX.m), run the conv trunk once per scale, give every window (ground truth
first, then proposals, as R-CNN and SPP-net cache them) the scale at which its area is
closest to 224 x 224, map it to cells of that scale's map, and write everything to the
feature cache (:mod:`spp_detect.cache`), which pools on read.

The scales of one image run one after another, each as a batch of one: their sizes
differ, and padding them to one batch would waste most of the compute on the smaller
scales.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from spp_detect.backbones import NORMALIZATIONS, BackboneSpec, Normalization, build_trunk, get_backbone, resolve_normalization
from spp_detect.cache import FORMAT_VERSION, cached_file_problem, write_cached_image
from spp_detect.datasets.voc import VOCImage
from spp_detect.images import ImageReadError, read_image
from spp_detect.spp import PAPER_LEVELS, exact_level
from spp_detect.stage_dir import open_stage_dir, source_key
from spp_detect.windows import choose_scales, scale_factors, windows_to_cells

__all__ = [
    "BadSetting",
    "ImageReadError",
    "ExtractSummary",
    "load_image_rgb",
    "resize_shorter_side",
    "prepare_trunk",
    "conv_maps",
    "assign_windows",
    "extract_config",
    "run_extract",
]

log = logging.getLogger(__name__)


class BadSetting(ValueError):
    """A setting cannot work (weights that do not fit the backbone, a scale too small for
    it); ``setting`` names it (``"weights"``, ``"scales"``, ``"levels"``)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


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


def prepare_trunk(trunk: nn.Module, device: torch.device) -> nn.Module:
    """Move a trunk to ``device`` in channels-last layout, in eval mode (for :func:`conv_maps`)."""
    return trunk.to(device=device, memory_format=torch.channels_last).eval()


@torch.inference_mode()
def conv_maps(
    trunk: nn.Module, norm: Normalization, image: np.ndarray, scales: Sequence[int], device: torch.device
) -> list[Tensor]:
    """Run ``trunk`` once per scale on ``np.ndarray[H, W, 3]`` uint8 RGB.

    Returns:
        One ``Tensor[C, h_s, w_s]`` float32 per scale, on ``device``.

    The input runs in channels-last layout, which roughly halves the CPU conv time of a
    channels-last trunk (:func:`prepare_trunk`) and changes no value beyond float rounding.
    """
    maps = []
    for scale in scales:
        pixels = torch.from_numpy(resize_shorter_side(image, scale)).to(device).permute(2, 0, 1)  # [3, h, w]
        batch = norm(pixels).unsqueeze(0).contiguous(memory_format=torch.channels_last)
        maps.append(trunk(batch)[0].contiguous())  # [C, h', w'], C-order for pooling and the cache
    return maps


def assign_windows(
    boxes: Tensor, width: int, height: int, scales: Sequence[int], spec: BackboneSpec, map_sizes: Sequence[tuple[int, int]]
) -> tuple[Tensor, Tensor]:
    """Choose each window's scale (area closest to 224 x 224) and map it to that scale's cells.

    Args:
        boxes: ``Tensor[N, 4]`` 0-based xyxy in original image pixels.
        width, height: original image size.
        scales: shorter-side scales, in the order of ``map_sizes``.
        spec: the backbone (stride and offset).
        map_sizes: ``(h, w)`` of each scale's conv map.

    Returns:
        ``(scale_index Tensor[N] int64, cells Tensor[N, 4] int64 inclusive)``.
    """
    factors = scale_factors(width, height, scales)
    scale_index = choose_scales(boxes, factors)
    sizes = torch.tensor(map_sizes, dtype=torch.int64).reshape(-1, 2)
    cells = windows_to_cells(boxes, factors[scale_index], spec.stride, spec.offset, sizes[scale_index])
    return scale_index, cells


def _check_smallest_scale(trunk: nn.Module, norm: Normalization, backbone: str, scale: int, device: torch.device) -> None:
    """Raise :class:`BadSetting` if a ``scale x scale`` image (the smallest any image is
    resized to) gives ``trunk`` an empty conv map."""
    try:
        (fmap,) = conv_maps(trunk, norm, np.zeros((scale, scale, 3), dtype=np.uint8), [scale], device)
        empty = min(fmap.shape[1:]) < 1
    except RuntimeError:  # "Output size is too small" inside the trunk
        empty = True
    if empty:
        raise BadSetting("scales", f"scale {scale} is too small for {backbone}: its conv map would be empty")


def extract_config(
    backbone: str,
    weights: str,
    input_norm: str,
    scales: Sequence[int],
    levels: Sequence[int],
    proposals_key: str,
    image_set: str,
) -> dict[str, object]:
    """The settings an extract cache is keyed by (the manifest adds the package version)."""
    weights_id = weights if weights in ("imagenet", "none") else source_key(Path(weights))
    norm_name = next(k for k, v in NORMALIZATIONS.items() if v == resolve_normalization(backbone, weights, input_norm))
    return {
        "backbone": backbone,
        "weights": weights_id,
        "input_norm": norm_name,
        "scales": [int(s) for s in scales],
        "levels": [int(n) for n in levels],
        "proposals": proposals_key,
        "image_set": image_set,
        "format": FORMAT_VERSION,
    }


@dataclass
class ExtractSummary:
    """What a run did. Times are wall seconds over the images it computed."""

    done: int = 0
    skipped: int = 0
    windows: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    image_ids: list[str] = field(default_factory=list)
    bad: list[Exception] = field(default_factory=list)  # skipped (skip_bad): each names its file
    redone: int = 0  # damaged files found in the cache and recomputed

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


def run_extract(
    images: Sequence[VOCImage],
    proposals: dict[str, np.ndarray],
    out: Path,
    *,
    backbone: str,
    weights: str,
    input_norm: str = "auto",
    scales: Sequence[int],
    levels: Sequence[int] = PAPER_LEVELS,
    proposals_key: str,
    image_set: str,
    device: torch.device,
    force: bool = False,
    shard: tuple[int, int] = (1, 1),
    progress: Callable[[Sequence[VOCImage]], Sequence[VOCImage]] | None = None,
    skip_bad: bool = False,
) -> ExtractSummary:
    """Fill the feature cache ``out`` for ``images``; resumable and shardable.

    Args:
        images: the VOC images (ground truth boxes are added to the windows).
        proposals: image id -> ``np.ndarray[M, 4]`` float32 0-based xyxy (``proposals.io``).
        out: cache folder. Images whose file exists are skipped.
        backbone, weights, input_norm: see :mod:`spp_detect.backbones`.
        scales: shorter-side scales (``PAPER_SCALES``; ``(688,)`` is the paper's 1-scale).
        levels: pyramid levels the cache will be pooled with.
        proposals_key: identifies the proposals (their manifest key or file hash).
        image_set: recorded in the manifest.
        device: where the trunk runs.
        force: recompute even if ``out`` was made with other settings.
        shard: ``(k, n)``, 1-based: this process takes images ``k-1, k-1+n, ...``.
        progress: wraps the image sequence (e.g. a tqdm bar); identity if None.
        skip_bad: skip (and list in ``summary.bad``) images that cannot be read or have no
            proposals, instead of raising.

    A file already in the cache that is damaged (cut short) or was written under another
    key is recomputed (``summary.redone``).

    Raises:
        SettingsChanged: ``out`` holds another configuration and ``force`` is false.
        KeyError: an image has no proposals entry (unless ``skip_bad``).
        ImageReadError: an image cannot be decoded (unless ``skip_bad``).
        StageWriteError: a cache file cannot be written (e.g. disk full); finished files stay.
    """
    bad_levels = [n for n in levels if not exact_level(int(n))]
    if bad_levels:
        raise BadSetting("levels", f"pyramid levels {bad_levels} are not supported by spatial_pyramid_pool")
    k, n = shard
    if not (1 <= k <= n):
        raise ValueError(f"shard must be K/N with 1 <= K <= N, got {k}/{n}")
    missing = [im.image_id for im in images if im.image_id not in proposals]
    if missing and not skip_bad:
        raise KeyError(f"no proposals for {len(missing)} image(s), e.g. {missing[:5]}")

    config = extract_config(backbone, weights, input_norm, scales, levels, proposals_key, image_set)
    manifest = open_stage_dir(out, "extract", config, force=force)
    spec = get_backbone(backbone)
    mine = list(images)[k - 1 :: n]
    summary = ExtractSummary()
    todo = []
    for im in mine:
        path = Path(out) / f"{im.image_id}.npz"
        problem = cached_file_problem(path, manifest["key"]) if path.is_file() else "missing"
        if problem is None:
            summary.skipped += 1
            continue
        if problem != "missing":
            log.warning("extract: redoing %s: %s", path, problem)
            summary.redone += 1
        if im.image_id not in proposals:
            summary.bad.append(KeyError(f"no proposals for image {im.image_id}"))
            continue
        todo.append(im)
    if not todo:
        return summary
    try:
        trunk = prepare_trunk(build_trunk(backbone, weights), device)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError, EOFError) as exc:
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
            first_line = "not a state_dict file (torch.load(weights_only=True) cannot read it)"
        else:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadSetting("weights", f"cannot load {weights} into {backbone}: {first_line}") from None
    norm = resolve_normalization(backbone, weights, input_norm)
    _check_smallest_scale(trunk, norm, backbone, min(scales), device)
    start = time.perf_counter()
    for image in progress(todo) if progress else todo:
        try:
            pixels = load_image_rgb(image.path, (image.width, image.height))
        except ImageReadError as exc:
            if not skip_bad:
                raise
            log.warning("%s (skipped)", exc)
            summary.bad.append(exc)
            continue
        height, width = pixels.shape[:2]
        boxes = torch.cat([torch.tensor(image.boxes), torch.tensor(proposals[image.image_id])])  # [N, 4] GT first
        is_gt = torch.arange(len(boxes)) < len(image.boxes)
        maps = conv_maps(trunk, norm, pixels, scales, device)
        scale_index, cells = assign_windows(boxes, width, height, scales, spec, [tuple(m.shape[1:]) for m in maps])
        summary.bytes_written += write_cached_image(
            Path(out) / f"{image.image_id}.npz", manifest["key"], width, height, boxes, is_gt, scale_index, cells, maps
        )
        summary.done += 1
        summary.windows += len(boxes)
        summary.image_ids.append(image.image_id)
    summary.seconds = time.perf_counter() - start
    return summary
