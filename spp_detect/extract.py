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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from spp_detect.backbones import (
    BackboneSpec,
    Normalization,
    build_trunk,
    get_backbone,
    normalization_name,
    resolve_normalization,
)
from spp_detect.boxes import mirror_boxes
from spp_detect.background_io import WriteBehind, reads_ahead
from spp_detect.cache import FORMAT_VERSION, cached_file_problem, record_image_paths, write_cached_image
from spp_detect.datasets.result_ids import ResultIds, record_result_ids
from spp_detect.datasets.voc import VOC_CLASSES, VOCImage
from spp_detect.image_trunk import TRUNK_DTYPES, conv_maps, load_image_rgb, prepare_trunk
from spp_detect.images import ImageReadError
from spp_detect.spp import PAPER_LEVELS
from proposals.io import load_proposals
from spp_detect.stage_dir import BadSetting, Progress, open_stage, settings_config, source_key, track, weights_field
from spp_detect.windows import PAPER_SCALES, choose_scales, scale_factors, windows_to_cells

__all__ = [
    "ExtractSummary",
    "assign_windows",
    "EXTRACT_MODES",
    "ExtractSettings",
    "crop_warp_maps",
    "run_extract",
]

log = logging.getLogger(__name__)

#: ``spp``: the paper's shared conv maps; ``crop-warp``: R-CNN's per-window forward (baseline).
EXTRACT_MODES: tuple[str, ...] = ("spp", "crop-warp")


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


@dataclass(frozen=True)
class ExtractSettings:
    """What an extract cache is computed with; with the proposals key, the image set, the
    class list and the cache format it is what the cache's manifest key hashes
    (:func:`spp_detect.stage_dir.settings_config`). ``input_norm`` holds the resolved
    convention (``auto`` picks it from the weights), ``scales`` the crop size in
    ``crop-warp`` mode.

    Attributes:
        backbone, weights, input_norm: see :mod:`spp_detect.backbones`; ``weights`` is
            ``"imagenet"``, ``"none"`` or a state_dict path (keyed by its SHA-256).
        scales: shorter-side scales (``PAPER_SCALES``; ``(688,)`` is the paper's 1-scale).
        levels: pyramid levels the cache will be pooled with.
        mode: ``"spp"`` (the paper: one conv pass per scale, windows pooled from the shared
            map) or ``"crop-warp"`` (R-CNN's baseline: every window cropped with context,
            warped to ``crop_size`` and sent through the trunk on its own; its map is pooled
            whole with the same pyramid). ``crop-warp`` ignores the scales given.
        crop_size: warped crop side in pixels (R-CNN: 227 for AlexNet; 224 here, the
            backbones' ImageNet input).
        context_pad: pixels of context around the box in the warped crop (R-CNN
            ``rcnn_im_crop.m``: ``padding = 16``).
        flip: cache the left-right mirror of every image, with its ground truth and
            proposals mirrored (:func:`spp_detect.boxes.mirror_boxes`), under the same
            image ids. The release fine-tunes on flipped images as well as the originals
            (``flip_finetune = true``, docs/sources.md 1.6) and trains the SVMs without them: give a
            flipped cache to ``finetune`` beside the plain one (``--cache A --cache A-flip``).
        max_proposals: only each image's first K proposals (None: all of them).
        precision: the trunk's arithmetic, ``fp32`` or ``bf16``.
    """

    backbone: str = "squeezenet1_0"
    weights: str = weights_field()
    input_norm: str = "auto"
    scales: tuple[int, ...] = field(default=PAPER_SCALES, metadata={"help": (
        "Shorter-side scales (paper 4.1); '688' is the paper's 1-scale setting.")})
    levels: tuple[int, ...] = field(default=PAPER_LEVELS, metadata={"help": (
        "Pyramid levels, in feature order (paper: 1,2,3,6).")})
    mode: str = field(default="spp", metadata={"help": (
        "spp: the paper (conv maps once per scale, windows pooled from them). crop-warp: R-CNN's baseline, "
        "every window cropped with 16 px context, warped to 224 and run through the trunk alone (its map "
        "pooled whole with the same pyramid; --scales is ignored). Slow by design: for comparisons.")})
    crop_size: int = 224
    context_pad: int = 16
    flip: bool = field(default=False, metadata={"help": (
        "Cache the left-right mirror of every image (boxes mirrored, same ids): the release fine-tunes on "
        "flipped images too. Give it to finetune beside the plain cache: --cache feat --cache feat-flip.")})
    #: only each image's first proposals (their ranking order, best first), or all (None)
    max_proposals: int | None = field(default=None, metadata={"help": (
        "Use only each image's first K proposals (best first), e.g. R-CNN's comparisons on the first 100 or "
        "2,000; default: all.")})
    #: the trunk's arithmetic (:data:`spp_detect.image_trunk.TRUNK_DTYPES`); maps are stored
    #: float16 either way
    precision: str = field(default="fp32", metadata={"help": (
        "Conv arithmetic. bf16: weights and activations in bfloat16 (float32 sums), ~2x faster on CPUs with "
        "AVX512-BF16/AMX and on GPUs, approximate (README: its measured mAP cost). The maps are stored float16 "
        "either way; predict computes them as the cache was.")})

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_norm", normalization_name(self.backbone, self.weights, self.input_norm))
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales) if self.mode == "spp" else (self.crop_size,))
        object.__setattr__(self, "levels", tuple(int(n) for n in self.levels))
        if self.mode not in EXTRACT_MODES:
            raise ValueError(f"extract mode must be one of {EXTRACT_MODES}, got {self.mode!r}")
        if not self.levels or min(self.levels) < 1:
            raise BadSetting("levels", f"pyramid levels must be positive integers, got {self.levels}")
        if not self.scales or min(self.scales) <= 0:
            raise BadSetting("scales", f"scales must be positive, got {self.scales}")
        if self.max_proposals is not None and self.max_proposals < 1:
            raise BadSetting("max-proposals", f"max-proposals must be at least 1, got {self.max_proposals}")
        if self.precision not in TRUNK_DTYPES:
            raise BadSetting("precision", f"precision must be one of {tuple(TRUNK_DTYPES)}, got {self.precision!r}")


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

    def describe(self, out: Path | str, device: torch.device | str, where: str = "", bad_before: int = 0) -> str:
        """The line a command prints; ``where``: this process's shard; ``bad_before``: images
        the dataset left out before the stage ran (``--skip-bad``)."""
        redone = f", {self.redone} damaged file(s) redone" if self.redone else ""
        return (f"extract{where}: {self.done} image(s) computed, {self.skipped} already cached, "
                f"{bad_before + len(self.bad)} bad{redone}, {self.windows / max(self.done, 1):.0f} windows/image, "
                f"{self.bytes_written / max(self.done, 1) / 1e6:.2f} MB/image, "
                f"{self.images_per_second:.2f} img/s on {device} -> {out}")


def run_extract(
    images: Sequence[VOCImage],
    proposals: Path | str,
    out: Path,
    settings: ExtractSettings,
    *,
    image_set: str,
    device: torch.device,
    force: bool = False,
    shard: tuple[int, int] = (1, 1),
    progress: Progress | None = None,
    skip_bad: bool = False,
    classes: Sequence[str] = VOC_CLASSES,
    result_ids: ResultIds | None = None,
) -> ExtractSummary:
    """Fill the feature cache ``out`` for ``images``; resumable and shardable.

    Args:
        images: the VOC images (their ground-truth boxes, labels and difficult flags are
            stored with the windows, so later stages need only the cache).
        proposals: a ``proposals`` stage folder or an R-CNN selective-search ``.mat`` file
            (:func:`proposals.io.load_proposals`: ``np.ndarray[M, 4]`` 0-based xyxy per image,
            best first; ``settings.max_proposals`` keeps the first M). Its manifest key (a
            file's SHA-256) enters the cache's key.
        out: cache folder. Images whose file exists are skipped.
        settings: what to compute (:class:`ExtractSettings`).
        image_set: recorded in the manifest.
        device: where the trunk runs.
        force: recompute even if ``out`` was made with other settings (in a sharded run,
            shard 1 deletes the old files; the others wait for it).
        shard: ``(k, n)``, 1-based: this process takes images ``k-1, k-1+n, ...``. The n
            shards may run at once into the same ``out`` (:mod:`spp_detect.distributed`).
        progress: the progress protocol (:class:`spp_detect.stage_dir.Progress`), or None.
        skip_bad: skip (and list in ``summary.bad``) images that cannot be read or have no
            usable proposals, instead of raising.
        classes: the class names the images' ``labels`` index (the dataset's,
            :class:`spp_detect.datasets.registry.Dataset`); stored in the manifest, from
            which every later stage reads it. The default is what ``read_voc`` labels with.
        result_ids: a COCO dataset's own image and category ids (the dataset's
            ``result_ids``): recorded in ``<out>/result_ids.json`` (not part of the key,
            like ``images.json``), so that ``detect`` writes its results in them.

    A file already in the cache that is damaged (cut short) or was written under another
    key is recomputed (``summary.redone``).

    Raises:
        SettingsChanged: ``out`` holds another configuration and ``force`` is false.
        KeyError: an image has no proposals entry (unless ``skip_bad``).
        ValueError: ``proposals`` is not a proposals folder or ``.mat`` file, or an image's
            proposals are damaged (unless ``skip_bad``).
        ImageReadError: an image cannot be decoded (unless ``skip_bad``).
        StageWriteError: a cache file cannot be written (e.g. disk full); finished files stay.
    """
    bad_proposals: list[Exception] | None = [] if skip_bad else None
    proposals_key = source_key(Path(proposals))
    windows = load_proposals(proposals, [im.image_id for im in images], bad=bad_proposals)
    if settings.max_proposals is not None:
        windows = {image_id: boxes[: settings.max_proposals] for image_id, boxes in windows.items()}
    config = {**settings_config(settings), "proposals": proposals_key, "image_set": image_set,
              "format": FORMAT_VERSION, "classes": list(classes)}
    stage = open_stage(out, "extract", config, force=force, shard=shard)

    def record_sidecars() -> None:
        """The images' files and ids beside the cache, written once the run's images are done
        (so a folder stopped midway holds only the manifest and finished images)."""
        if shard[0] == 1:  # one writer; every shard is given the whole list
            record_image_paths(out, images)
            if result_ids is not None:
                record_result_ids(out, result_ids)

    spec = get_backbone(settings.backbone)
    todo, skipped, redone = stage.todo(images, lambda im: Path(out) / f"{im.image_id}.npz",
                                       lambda path: cached_file_problem(path, stage.key))
    summary = ExtractSummary(skipped=skipped, redone=redone)
    unusable = {e.image_id: e for e in bad_proposals or []}
    summary.bad = [unusable[im.image_id] for im in todo if im.image_id in unusable]
    todo = [im for im in todo if im.image_id in windows]
    if not todo:
        record_sidecars()
        return summary
    backbone, weights = settings.backbone, settings.weights
    try:
        trunk = prepare_trunk(build_trunk(backbone, weights), device, settings.precision)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError, EOFError) as exc:
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
            first_line = "not a state_dict file (torch.load(weights_only=True) cannot read it)"
        else:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadSetting("weights", f"cannot load {weights} into {backbone}: {first_line}") from None
    norm = resolve_normalization(backbone, weights, settings.input_norm)
    _check_smallest_scale(trunk, norm, backbone, settings.crop_size if settings.mode == "crop-warp" else min(settings.scales), device)
    start = time.perf_counter()
    with WriteBehind(background=reads_ahead(device)) as writes:  # on a GPU: compress beside the next conv pass
        for image in track(progress, todo, "extract", initial=skipped):
            if _extract_image(image, windows[image.image_id], trunk, norm, spec, settings, device, stage.key, out,
                              writes, summary, skip_bad):
                summary.done += 1
                summary.image_ids.append(image.image_id)
    summary.bytes_written = sum(writes.results)
    summary.seconds = time.perf_counter() - start
    record_sidecars()
    return summary


def _extract_image(image: VOCImage, image_proposals: np.ndarray, trunk: nn.Module, norm: Normalization, spec: BackboneSpec,
                   settings: ExtractSettings, device: torch.device, key: str, out: Path, writes: WriteBehind,
                   summary: ExtractSummary, skip_bad: bool) -> bool:
    """One image's windows (``image.boxes`` ground truth first, then ``image_proposals``
    ``np.ndarray[M, 4]``, 0-based xyxy) and conv maps, handed to ``writes`` for its cache
    file; False when the image cannot be read and ``skip_bad`` (listed in ``summary.bad``)."""
    try:
        pixels = load_image_rgb(image.path, (image.width, image.height))
    except ImageReadError as exc:
        if not skip_bad:
            raise
        log.warning("%s (skipped)", exc)
        summary.bad.append(exc)
        return False
    height, width = pixels.shape[:2]
    boxes = torch.cat([torch.tensor(image.boxes), torch.tensor(image_proposals)])  # [N, 4] GT first
    if settings.flip:
        pixels = np.ascontiguousarray(pixels[:, ::-1])
        boxes = mirror_boxes(boxes, width)
    is_gt = torch.arange(len(boxes)) < len(image.boxes)
    if settings.mode == "spp":
        maps = conv_maps(trunk, norm, pixels, settings.scales, device)
        scale_index, cells = assign_windows(
            boxes, width, height, settings.scales, spec, [tuple(m.shape[1:]) for m in maps]
        )
    else:
        tiled, cells = crop_warp_maps(trunk, norm, pixels, boxes, settings.crop_size, settings.context_pad, device)
        maps, scale_index = [tiled], torch.zeros(len(boxes), dtype=torch.int64)
    writes.submit(write_cached_image, Path(out) / f"{image.image_id}.npz", key, width, height, boxes, is_gt,
                  scale_index, cells, maps, torch.tensor(image.labels, dtype=torch.int64),
                  torch.tensor(image.difficult, dtype=torch.bool))
    summary.windows += len(boxes)
    return True


@torch.inference_mode()
def crop_warp_maps(
    trunk: nn.Module,
    norm: Normalization,
    image: np.ndarray,
    boxes: Tensor,
    crop_size: int,
    context_pad: int,
    device: torch.device,
    batch_size: int = 32,
) -> tuple[Tensor, Tensor]:
    """R-CNN's baseline features: every window warped to its own crop and run through ``trunk``.

    Each box is enlarged about its centre so that, once warped to ``crop_size`` pixels,
    ``context_pad`` of them are context (R-CNN ``rcnn_im_crop.m``, ``'warp'`` with
    ``padding = 16``), then resampled bilinearly (``roi_align`` at bin centres, one sample
    per output pixel, no antialiasing). Context falling outside the image is the mean
    (zero after normalisation), as R-CNN pads with the mean.

    The crops' maps (each ``[C, h, w]``) are tiled side by side into one ``[C, h, N * w]``
    map, so that pooling window ``j``'s cells ``(j w, 0, j w + w - 1, h - 1)`` with the
    SPP op pools that crop's whole map: the cache format and every later stage stay as
    they are.

    Args:
        image: ``np.ndarray[H, W, 3]`` uint8 RGB.
        boxes: ``Tensor[N, 4]`` 0-based xyxy in image pixels.

    Returns:
        ``(tiled Tensor[C, h, N * w] float32 on device, cells Tensor[N, 4] int64)``.
    """
    from torchvision.ops import roi_align

    pixels = norm(torch.from_numpy(image).to(device).permute(2, 0, 1)).unsqueeze(0)  # [1, 3, H, W]
    boxes = boxes.to(device=device, dtype=torch.float32)
    grow = crop_size / (crop_size - 2.0 * context_pad)  # the box fills the crop minus the padding
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * grow
    padded = torch.cat([centre - half, centre + half], dim=1)  # [N, 4]
    rois = torch.cat([padded.new_zeros((len(padded), 1)), padded], dim=1)  # [N, 5]
    parts = []
    for start in range(0, len(rois), batch_size):
        crops = roi_align(pixels, rois[start : start + batch_size], crop_size, 1.0, sampling_ratio=1, aligned=True)
        parts.append(trunk(crops.contiguous(memory_format=torch.channels_last)).contiguous())  # [B, C, h, w]
    if parts:
        maps = torch.cat(parts)
    else:
        probe = trunk(pixels.new_zeros((1, 3, crop_size, crop_size)))
        maps = probe[:0]
    num, channels, h, w = maps.shape
    tiled = maps.permute(1, 2, 0, 3).reshape(channels, h, num * w)  # crop j at columns j*w .. j*w+w-1
    j = torch.arange(num, dtype=torch.int64)
    cells = torch.stack([j * w, torch.zeros_like(j), j * w + w - 1, torch.full_like(j, h - 1)], dim=1)
    return tiled.contiguous(), cells
