"""Whole-image features: one SPP vector per image (SPP-net 3.2, Table 3).

Views (paper 3.2):

* ``full``: the whole image with its shorter side resized to ``size``, any aspect ratio
  (Table 3 (c), (d));
* ``crop``: the shorter side resized to ``size``, then the centre ``size x size`` square
  (Table 3 (a), (b); the paper's crop is 224).

Pooling of the trunk's last map ``[C, h, w]``:

* ``spp``: every level ``n`` of the pyramid over the whole map, bins
  ``[floor(i w / n), ceil((i + 1) w / n))`` as :func:`spp_detect.spp.spatial_pyramid_pool`.
  Over the whole map those are exactly ``torch.nn.functional.adaptive_max_pool2d``'s bins,
  which pool a batch at once (``tests/test_classification.py`` checks both agree);
* ``plain``: the fixed pool5 of a plain (no-SPP) net: a 3 x 3 max pool with stride 2, as
  AlexNet's and ZF-5's pool5 (paper Table 3 (a); Table 1's "plain net" pool5 ``6 x 6``).
  On a 224 crop's 13 x 13 SqueezeNet map it gives the same bins as level 6; on other map
  sizes it does not, and the vector length then depends on the input size, so it needs
  the crop view.

Images whose views have the same shape run as one batch; each image's vector does not
depend on what else is in its batch (beyond float rounding).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spp_detect.backbones import Normalization, build_trunk, resolve_normalization
from spp_detect.image_trunk import load_image_rgb, prepare_trunk, resize_shorter_side
from spp_detect.spp import PAPER_LEVELS
from spp_detect.stage_dir import Progress, atomic_write, open_stage, read_manifest, settings_config, track, weights_field

__all__ = [
    "VIEWS",
    "POOLINGS",
    "FeatureSettings",
    "FeatureSet",
    "view_image",
    "pool_whole",
    "image_features",
    "run_by_shape",
    "run_classify_features",
    "FeaturesSummary",
    "load_features",
]

VIEWS = ("crop", "full")
POOLINGS = ("spp", "plain")
#: AlexNet / ZF-5 pool5: 3 x 3 max pool, stride 2 (Krizhevsky et al. 2012; paper Table 1 "plain net").
PLAIN_POOL_KERNEL, PLAIN_POOL_STRIDE = 3, 2


@dataclass(frozen=True)
class FeatureSettings:
    """Settings of a ``classify-features`` run; the stage folder's manifest hashes them."""

    backbone: str = "squeezenet1_0"
    weights: str = weights_field()
    input_norm: str = "auto"
    view: str = field(default="full", metadata={"help": (
        "full: shorter side resized to --size, any aspect ratio; crop: then the centre --size square (paper "
        "3.2).")})
    size: int = field(default=224, metadata={"help": (
        "Shorter side in pixels (paper: 224; best full size on VOC: 392).")})
    levels: tuple[int, ...] = field(default=PAPER_LEVELS, metadata={"help": (
        "Pyramid levels pooled over the whole conv map (6: the single pool5 level).")})
    pooling: str = field(default="spp", metadata={"help": (
        "spp: the pyramid --levels; plain: a plain net's fixed 3x3/2 pool5 (needs --view crop).")})

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {self.view!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pooling == "plain" and self.view != "crop":
            raise ValueError("plain pooling (fixed 3x3/2 pool5) gives a fixed-length vector only on the crop view")
        if self.size < 32:
            raise ValueError(f"size must be at least 32 pixels, got {self.size}")
        bad = [n for n in self.levels if n < 1]
        if not self.levels or bad:
            raise ValueError(f"unsupported pyramid levels {tuple(self.levels)}")


def view_image(image: np.ndarray, view: str, size: int, crop_size: int | None = None) -> np.ndarray:
    """The ``full`` or ``crop`` view of ``np.ndarray[H, W, 3]`` uint8 RGB.

    full: shorter side resized to ``size`` (bilinear, :func:`resize_shorter_side`);
    crop: that, then the centre ``crop_size x crop_size`` square (``crop_size`` defaults to
    ``size``; left/top offset ``(W' - crop_size) // 2``). Paper Table 2 uses size 256, crop 224.
    """
    resized = resize_shorter_side(image, size)
    if view == "full":
        return resized
    if view != "crop":
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    crop = size if crop_size is None else crop_size
    height, width = resized.shape[:2]
    if crop > min(height, width):
        raise ValueError(f"crop {crop} is larger than the resized image {width} x {height}")
    top, left = (height - crop) // 2, (width - crop) // 2
    return np.ascontiguousarray(resized[top : top + crop, left : left + crop])


def pool_whole(maps: Tensor, levels: Sequence[int] = PAPER_LEVELS, pooling: str = "spp") -> Tensor:
    """Pool each whole map of ``Tensor[B, C, h, w]`` into one vector per image.

    Returns:
        ``spp``: ``Tensor[B, C * sum(n * n)]``, level by level in ``levels`` order, each
        ``[C, n, n]`` (the layout of :func:`spp_detect.spp.spatial_pyramid_pool`).
        ``plain``: ``Tensor[B, C * h' * w']`` after a 3 x 3 / 2 max pool.
        Differentiable (used by the trained classifier too).
    """
    if pooling == "plain":
        return F.max_pool2d(maps, PLAIN_POOL_KERNEL, PLAIN_POOL_STRIDE).flatten(1)
    if pooling != "spp":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return torch.cat([F.adaptive_max_pool2d(maps, int(n)).flatten(1) for n in levels], dim=1)


@torch.inference_mode()
def image_features(
    trunk: nn.Module,
    norm: Normalization,
    images: Iterable[np.ndarray],
    settings: FeatureSettings,
    device: torch.device,
    batch_size: int = 16,
) -> Iterable[tuple[int, np.ndarray]]:
    """Yield ``(index, np.ndarray[D] float32)`` for each image of ``images``.

    Args:
        trunk: a conv trunk (:func:`spp_detect.extract.prepare_trunk`).
        norm: its input normalisation.
        images: ``np.ndarray[H, W, 3]`` uint8 RGB images; read ``batch_size`` at a time.
        settings: view, size, levels, pooling.
        batch_size: images read at a time; those whose views share a shape run together.

    Vectors come out grouped by view shape within each chunk of ``batch_size`` images, so
    ``index`` says which image each belongs to.
    """
    chunk: list[tuple[int, np.ndarray]] = []
    for index, image in enumerate(images):
        chunk.append((index, view_image(image, settings.view, settings.size)))
        if len(chunk) == batch_size:
            yield from _run_chunk(trunk, norm, chunk, settings, device)
            chunk = []
    if chunk:
        yield from _run_chunk(trunk, norm, chunk, settings, device)


def _run_chunk(trunk, norm, chunk, settings, device):
    def forward(batch: Tensor) -> Tensor:
        return pool_whole(trunk(batch).float(), settings.levels, settings.pooling)

    yield from run_by_shape(forward, norm, chunk, device)


def run_by_shape(
    forward: Callable[[Tensor], Tensor], norm: Normalization, views: Sequence[tuple[int, np.ndarray]], device: torch.device
) -> Iterable[tuple[int, np.ndarray]]:
    """Run ``forward`` on ``(index, np.ndarray[h, w, 3] uint8 RGB)`` views, one batch per
    distinct shape (channels-last input); yield ``(index, np.ndarray[D] float32)``."""
    groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for index, view in views:
        groups.setdefault(view.shape, []).append((index, view))
    for members in groups.values():
        pixels = torch.from_numpy(np.stack([v for _, v in members])).to(device).permute(0, 3, 1, 2)  # [B, 3, h, w]
        batch = norm(pixels).contiguous(memory_format=torch.channels_last)
        vectors = forward(batch).float().cpu().numpy()
        for (index, _), vector in zip(members, vectors):
            yield index, vector.astype(np.float32)


@dataclass
class FeatureSet:
    """Features of an image set: ``features np.ndarray[N, D]`` float32, ``labels
    np.ndarray[N, K]`` int8 in ``{1, 0 (ignored), -1}``, in ``image_ids`` order."""

    image_ids: list[str]
    features: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    config: dict[str, object] = field(default_factory=dict)


IMAGES_FILE = "images.json"


@dataclass
class FeaturesSummary:
    """What a ``classify-features`` run did: images ``done`` (computed) and ``skipped``
    (already in the folder), ``seconds`` over the computed ones."""

    done: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def describe(self, out: Path | str) -> str:
        """The line a command prints."""
        rate = f", {self.done / self.seconds:.1f} img/s" if self.done and self.seconds else ""
        return f"classify-features: {self.done} image(s) computed, {self.skipped} already done{rate} -> {out}"


def run_classify_features(
    image_ids: Sequence[str],
    paths: Sequence[Path],
    labels: np.ndarray,
    classes: Sequence[str],
    out: Path,
    settings: FeatureSettings,
    dataset: dict[str, object],
    *,
    device: torch.device,
    force: bool = False,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> FeaturesSummary:
    """Fill the stage folder ``out``: ``manifest.json``, ``images.json`` (ids, labels,
    classes) and one ``<n>.npy`` (``float32 [D]``) per image, ``n`` its list position.
    The trunk (``settings``) is built only when there is an image to compute.

    Resumable: images whose file exists are skipped.

    Raises:
        SettingsChanged: ``out`` holds other settings and ``force`` is false.
        ImageReadError: an image cannot be decoded.
    """
    config = {**settings_config(settings), "dataset": dataset}
    stage = open_stage(out, "classify-features", config, force=force)
    out = Path(out)
    listing = {"image_ids": list(image_ids), "classes": list(classes), "labels": np.asarray(labels).tolist()}
    atomic_write(out / IMAGES_FILE, lambda tmp: tmp.write_text(json.dumps(listing)))
    todo, skipped, _ = stage.todo(range(len(image_ids)), lambda n: out / f"{n}.npy")
    if not todo:
        return FeaturesSummary(skipped=skipped)
    trunk = prepare_trunk(build_trunk(settings.backbone, settings.weights), device)
    norm = resolve_normalization(settings.backbone, settings.weights, settings.input_norm)
    start = time.perf_counter()
    pixels = (load_image_rgb(paths[n]) for n in todo)
    features = image_features(trunk, norm, pixels, settings, device, batch_size)
    for index, vector in track(progress, features, "classify-features", total=len(image_ids), initial=skipped):
        atomic_write(out / f"{todo[index]}.npy", lambda tmp, v=vector: np.save(tmp, v))
    return FeaturesSummary(len(todo), len(image_ids) - len(todo), time.perf_counter() - start)


def load_features(folder: Path) -> FeatureSet:
    """Read a finished ``classify-features`` folder.

    Raises:
        FileNotFoundError: not such a folder, or some image's vector is missing (the run
            did not finish: rerun the same command to resume).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("stage") != "classify-features":
        raise FileNotFoundError(f"{folder} holds '{manifest.get('stage')}' output, not classify-features")
    listing = json.loads((folder / IMAGES_FILE).read_text())
    ids = listing["image_ids"]
    missing = [n for n in range(len(ids)) if not (folder / f"{n}.npy").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} of {len(ids)} images have no features yet; rerun classify-features to finish")
    features = np.stack([np.load(folder / f"{n}.npy") for n in range(len(ids))]) if ids else np.zeros((0, 0), np.float32)
    labels = np.asarray(listing["labels"], dtype=np.int8).reshape(len(ids), len(listing["classes"]))
    return FeatureSet(ids, features, labels, tuple(listing["classes"]), manifest["config"])
