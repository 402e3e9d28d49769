"""Fine-tuning the conv trunk through SPP: image-centric minibatches, as Fast R-CNN trains.

SPP-net fine-tunes only its fc layers (paper 4.1 and 5.1): back-propagating through SPP
from windows of many images would cost one trunk pass per window's image. Fast R-CNN
(Girshick, ICCV 2015, section 2.3) samples minibatches hierarchically instead: ``N = 2``
images and ``R / N = 64`` windows of each, 25% of them foreground, so the windows of one
image share its forward and backward pass; its section 4.5 shows that training the conv
layers (from conv3_1 for VGG16) is where the accuracy is. This module is that training
loop over this pipeline's own pieces (docs/sources.md, "Fast R-CNN"):

* windows and labels come from the extract caches (:func:`spp_detect.finetune.collect_training_windows`:
  fg IoU >= 0.5 labelled with the box's class, bg IoU in [0.1, 0.5));
* pixels come from the images the cache records (``images.json``), mirrored for a
  ``--flip`` cache, resized so the shorter side is a scale drawn per image;
* the trunk runs forward and backward from ``train_from`` on (the layers before it stay
  frozen, as Fast R-CNN keeps conv1-conv2: they are generic; batch norms stay frozen);
* windows are pooled by :func:`spp_detect.spp.spatial_pyramid_pool`, whose autograd path
  (``roi_pool``) gives exactly the values the CPU kernel of ``extract``/``detect`` gives
  (``tests/test_conv_finetune.py``), then fc6 -> fc7 -> fc8 as the fc-only fine-tuning.

Every draw is seeded by ``(seed, iteration)`` (images by an epoch permutation, windows,
scale, dropout), identically in every process, so a resumed run continues to the state an
uninterrupted one reaches and ``N`` processes (each its images ``rank::N``) compute what one does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from spp_detect.backbones import BackboneSpec, build_model, get_backbone
from spp_detect.cache import FeatureCache
from spp_detect.head import DROPOUT, SPPHead
from spp_detect.image_trunk import load_image_rgb, resize_shorter_side
from spp_detect.spp import spatial_pyramid_pool
from spp_detect.stage_dir import atomic_write, file_sha256, weights_identity
from spp_detect.windows import scale_factors, windows_to_cells

__all__ = [
    "FC_ONLY",
    "TRUNK_FILE",
    "TrunkRecord",
    "ImageWindows",
    "ConvDetector",
    "trunk_layer_index",
    "build_conv_detector",
    "image_minibatch",
    "cache_image_paths",
    "save_trunk",
    "load_trunk_record",
    "with_trunk_of",
]

#: ``train_from`` value of the paper's recipe: only fc6, fc7 and fc8 are trained.
FC_ONLY = "fc6"
#: The fine-tuned full model's state_dict in a head folder (torchvision layout: any stage
#: that takes ``--weights`` reads it as it reads an ImageNet file).
TRUNK_FILE = "trunk.pth"
#: Layer names of SqueezeNet v1.0's ``features`` (torchvision's indices), so that
#: ``--train-from fire5`` reads as the architecture does; any backbone also takes the index.
LAYER_NAMES: dict[str, dict[str, int]] = {
    "squeezenet1_0": {"conv1": 0, "fire2": 3, "fire3": 4, "fire4": 5, "fire5": 7, "fire6": 8, "fire7": 9,
                      "fire8": 10, "fire9": 12},
}


def trunk_layer_index(backbone: str, name: str, num_layers: int) -> int:
    """Index into the trunk's layers (``nn.Sequential`` children) of ``name``: a name of
    :data:`LAYER_NAMES` or a plain index ``0 .. num_layers - 1``.

    Raises:
        ValueError: neither; the message lists the names this backbone knows.
    """
    names = LAYER_NAMES.get(backbone, {})
    if name in names:
        return names[name]
    if name.isdigit() and int(name) < num_layers:
        return int(name)
    known = ", ".join(names) if names else "none"
    raise ValueError(f"--train-from {name!r}: not a layer of {backbone}'s trunk (names: {known}; or an index "
                     f"0..{num_layers - 1}); 'fc6' trains the fc layers only")


@dataclass(frozen=True)
class ImageWindows:
    """One image of a minibatch: ``pair`` (index into the training pairs), ``window``
    ``np.ndarray[R]`` window indices in the cache, ``label`` ``np.ndarray[R]`` (0 = bg), and
    the shorter-side ``scale`` it runs at."""

    pair: int
    window: np.ndarray
    label: np.ndarray
    scale: int


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_images: int) -> np.ndarray:
    return np.random.default_rng([seed, 2, epoch]).permutation(num_images)


def image_minibatch(
    fg_by_image: list[np.ndarray], bg_by_image: list[np.ndarray], fg_label_by_image: list[np.ndarray],
    iteration: int, seed: int, images_per_batch: int, windows_per_image: int, fg_fraction: float,
    scales: tuple[int, ...],
) -> list[ImageWindows]:
    """The images and windows of minibatch ``iteration`` (Fast R-CNN 2.3).

    Images are taken in the order of a permutation drawn per epoch (every training image
    once per epoch); of each, ``min(round(fg_fraction R), fg)`` foreground windows and
    up to ``R`` minus that background windows, both without replacement (Fast R-CNN's
    ``minibatch.py``); a scale uniformly from ``scales``. Seeded by ``(seed, iteration)``.
    """
    num = len(fg_by_image)
    rng = np.random.default_rng([seed, 1, iteration])
    per_fg = round(fg_fraction * windows_per_image)
    batch = []
    for j in range(images_per_batch):
        position = iteration * images_per_batch + j
        n = int(_epoch_order(seed, position // num, num)[position % num])
        fg, bg = fg_by_image[n], bg_by_image[n]
        take_fg = rng.choice(len(fg), min(per_fg, len(fg)), replace=False)
        take_bg = rng.choice(len(bg), min(windows_per_image - len(take_fg), len(bg)), replace=False)
        window = np.concatenate([fg[take_fg], bg[take_bg]])
        label = np.concatenate([fg_label_by_image[n][take_fg], np.zeros(len(take_bg), np.int64)])
        batch.append(ImageWindows(n, window, label, int(scales[rng.integers(len(scales))])))
    return batch


class ConvDetector(nn.Module):
    """Trunk (frozen prefix + trained suffix) -> SPP of each image's windows -> head.

    ``frozen`` and ``trained`` are the trunk's layers before and from ``train_from``; the
    prefix runs without autograd. Batch norms are kept in eval mode with frozen affine
    parameters (:meth:`train` leaves the trunk in eval mode: the trunks here have no
    dropout; Fast R-CNN froze its batch-norm-free VGG's first layers the same way).
    """

    def __init__(self, frozen: nn.Sequential, trained: nn.Sequential, head: SPPHead, spec: BackboneSpec,
                 levels: tuple[int, ...]) -> None:
        super().__init__()
        self.frozen, self.trained, self.head = frozen, trained, head
        self.stride, self.offset, self.levels = spec.stride, spec.offset, tuple(levels)
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        for m in self.trained.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ConvDetector":
        super().train(mode)
        self.frozen.eval()
        self.trained.eval()
        return self

    def conv_map(self, pixels: Tensor) -> Tensor:
        """``Tensor[1, 3, H, W]`` normalised input -> ``Tensor[C, h, w]`` conv map (with autograd
        from the trained layers)."""
        with torch.no_grad():
            x = self.frozen(pixels)
        return self.trained(x)[0]

    def forward(self, inputs: list[Tensor], boxes: list[Tensor], factors: list[float], dropout_masks: Tensor) -> Tensor:
        """Class logits ``Tensor[R, num_classes]`` of the windows of several images.

        Args:
            inputs: per image ``Tensor[1, 3, H, W]`` normalised pixels at its scale.
            boxes: per image ``Tensor[R_i, 4]`` windows, 0-based xyxy in original image pixels.
            factors: per image, the resize factor original -> scaled pixels.
            dropout_masks: ``Tensor[2, R, fc_dim]`` (``R = sum R_i``), see :class:`SPPHead`.
        """
        pooled = []
        for pixels, b, factor in zip(inputs, boxes, factors):
            fmap = self.conv_map(pixels)
            size = torch.tensor([fmap.shape[1:]], dtype=torch.int64).expand(len(b), 2)
            cells = windows_to_cells(b, torch.full((len(b),), factor, dtype=torch.float64), self.stride, self.offset, size)
            pooled.append(spatial_pyramid_pool(fmap, cells.to(fmap.device), self.levels))
        return self.head(torch.cat(pooled), dropout_masks=dropout_masks)


def build_conv_detector(backbone: str, weights: str, train_from: str, head: SPPHead, levels: tuple[int, ...],
                        device: torch.device) -> tuple[ConvDetector, nn.Module]:
    """The trainable detector and the full classification model whose trunk it trains
    (saved whole by :func:`save_trunk`). ``weights``: what :func:`build_model` takes."""
    spec = get_backbone(backbone)
    model = build_model(backbone, weights)
    trunk = spec.trunk_of(model)
    if not isinstance(trunk, nn.Sequential):
        raise ValueError(f"the {backbone} trunk is not a sequence of layers; conv fine-tuning needs one")
    start = trunk_layer_index(backbone, train_from, len(trunk))
    layers = list(trunk.children())
    detector = ConvDetector(nn.Sequential(*layers[:start]), nn.Sequential(*layers[start:]), head, spec, levels)
    detector.to(device=device, memory_format=torch.channels_last)
    return detector, model


def cache_image_paths(cache: FeatureCache) -> dict[str, str]:
    """Image id -> image file of an extract cache (its ``images.json``).

    Raises:
        ValueError: the cache records none (made before extract wrote them): rerun extract.
    """
    path = cache.folder / "images.json"
    if not path.is_file():
        raise ValueError(f"{cache.folder} records no image files (images.json); rerun the same extract command "
                         "(it adds them, reusing every cached image): conv fine-tuning reads the pixels")
    return json.loads(path.read_text())


def load_training_pixels(cache: FeatureCache, path: str, width: int, height: int) -> np.ndarray:
    """``np.ndarray[H, W, 3]`` uint8 RGB of a training image, mirrored when the cache holds
    mirrored images (``extract --flip``), so that its cached windows fit."""
    pixels = load_image_rgb(path, (width, height))
    if cache.manifest["config"].get("flip"):
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    return pixels


def scaled_input(pixels: np.ndarray, scale: int, norm, device: torch.device) -> tuple[Tensor, float]:
    """Normalised ``Tensor[1, 3, h, w]`` (channels-last) of ``pixels`` resized to ``scale``, and
    the resize factor (:func:`spp_detect.windows.scale_factors`)."""
    height, width = pixels.shape[:2]
    x = torch.from_numpy(resize_shorter_side(pixels, scale)).to(device).permute(2, 0, 1)
    batch = norm(x).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return batch, float(scale_factors(width, height, (scale,))[0])


def dropout_masks(seed: int, iteration: int, rows: int, fc_dim: int, device: torch.device) -> Tensor:
    """``Tensor[2, rows, fc_dim]`` dropout masks (0 or ``1 / (1 - p)``) of minibatch
    ``iteration``, seeded by ``(seed, iteration)`` as the fc-only fine-tuning draws them."""
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + iteration)
    keep = torch.rand((2, rows, fc_dim), generator=generator, device=device) >= DROPOUT
    return keep.float() / (1.0 - DROPOUT)


@dataclass(frozen=True)
class TrunkRecord:
    """A fine-tuned trunk in a head folder (``trunk.json``): the backbone, its input
    normalisation, the weights it started from (their identity), the first trained layer,
    and the SHA-256 of ``trunk.pth``."""

    folder: Path
    backbone: str
    input_norm: str
    source_weights: str
    train_from: str
    sha256: str

    @property
    def path(self) -> Path:
        return self.folder / TRUNK_FILE

    @property
    def identity(self) -> str:
        """How a cache extracted with it records its weights (:func:`weights_identity`)."""
        return f"sha256:{self.sha256}"


def save_trunk(folder: Path, model: nn.Module, backbone: str, input_norm: str, source_weights: str,
               train_from: str) -> TrunkRecord:
    """Write ``<folder>/trunk.pth`` (the full model's state_dict, on the CPU) and ``trunk.json``."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / TRUNK_FILE, lambda p: torch.save(state, p))
    record = TrunkRecord(folder, backbone, input_norm, weights_identity(source_weights), train_from,
                         file_sha256(folder / TRUNK_FILE))
    meta = {"backbone": backbone, "input_norm": input_norm, "source_weights": record.source_weights,
            "train_from": train_from, "file": TRUNK_FILE, "sha256": record.sha256}
    atomic_write(folder / "trunk.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    return record


def load_trunk_record(folder: Path | str) -> TrunkRecord | None:
    """The fine-tuned trunk of a head folder, or None for an fc-only head.

    Raises:
        ValueError: ``trunk.pth`` is not the file ``trunk.json`` records (changed or damaged).
    """
    folder = Path(folder)
    path = folder / "trunk.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    record = TrunkRecord(folder, meta["backbone"], meta["input_norm"], meta["source_weights"], meta["train_from"],
                         meta["sha256"])
    if not record.path.is_file() or file_sha256(record.path) != record.sha256:
        raise ValueError(f"{record.path} is missing or is not the trunk {path} records (SHA-256 differs); retrain it")
    return record



def with_trunk_of(settings, head_folder: Path | str):
    """``settings`` (:class:`spp_detect.extract.ExtractSettings`) computing maps with the
    fine-tuned trunk of a head folder: its backbone, ``trunk.pth`` and the input
    normalisation it was trained with (the cache's key then holds the trunk's SHA-256).

    Raises:
        ValueError: the head was trained with the fc layers only (no trunk of its own).
    """
    from dataclasses import replace

    record = load_trunk_record(head_folder)
    if record is None:
        raise ValueError(f"{head_folder} holds an fc-only head (finetune without --train-from): it has no trunk of its "
                         "own; extract with --weights as its training caches were")
    return replace(settings, backbone=record.backbone, weights=str(record.path), input_norm=record.input_norm)
