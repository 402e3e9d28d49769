"""Training the SPP classifier end to end on image labels, single- or multi-size (SPP-net 2.3).

* Data (paper 3.1, the ImageNet recipe): each image's shorter side resized to ``resize``
  (256) once; every epoch a random ``crop x crop`` (224) square of it, flipped half the time.
* Single-size: every epoch at 224. Multi-size (``sizes=(224, 180)``): epoch ``e`` runs at
  ``sizes[e % len(sizes)]``, switching every full epoch; a 180 input is the 224 crop
  resized to 180 (bilinear), "so the regions at both scales differ only in resolution but
  not in content/layout" (paper 2.3). The same module, hence the same parameters, runs at
  both sizes (:class:`spp_detect.classification.model.SPPClassifier`).
* Loss: multi-label binary cross-entropy over the classes; labels ``1`` are positives,
  ``-1`` negatives, ``0`` (VOC: only difficult objects of the class) left out.
* Optimiser: SGD with momentum 0.9 and weight decay 5e-4 (the paper's Caffe/cuda-convnet
  ImageNet settings, AlexNet's), constant learning rate.
* Checkpoint ``checkpoint.pt`` (model and optimiser state_dicts, epoch, history) after
  every epoch, written atomically; a rerun resumes from it. Randomness (order, crops,
  flips, dropout) is seeded per epoch from ``(seed, epoch)``, so a resumed run reaches the
  same state as an uninterrupted one.
* Test views (paper Table 2): shorter side resized to 256; ``crop`` is its centre 224,
  ``full`` the whole resized image.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from spp_detect.backbones import Normalization, build_trunk, get_backbone
from spp_detect.classification.features import run_by_shape, view_image
from spp_detect.classification.model import SPPClassifier
from spp_detect.image_trunk import resize_shorter_side
from spp_detect.spp import PAPER_LEVELS
from spp_detect.stage_dir import Progress, atomic_write, open_stage, settings_config, track, weights_field

__all__ = [
    "TrainSettings",
    "TrainState",
    "epoch_size",
    "build_classifier",
    "make_batches",
    "multilabel_loss",
    "train_epoch",
    "run_training",
    "load_trained",
    "predict",
]

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"


@dataclass(frozen=True)
class TrainSettings:
    """Settings of ``train-spp-classifier``; the stage folder's manifest hashes them."""

    backbone: str = "squeezenet1_0"
    weights: str = weights_field()
    input_norm: str = "auto"
    sizes: tuple[int, ...] = field(default=(224,), metadata={"help": (  # (224, 180): the paper's multi-size training
        "Training input sizes, one per epoch in turn: 224 (single-size) or 224,180 (multi-size, paper 2.3).")})
    resize: int = 256  # shorter side before cropping (paper 3.1)
    levels: tuple[int, ...] = PAPER_LEVELS
    hidden: int = field(default=128, metadata={"help": "Width of the hidden fc layer of the head."})
    trainable_layers: int = field(default=1, metadata={"help": (
        "Last trunk layers trained with the head (SqueezeNet: 1 = fire9).")})
    dropout: float = 0.5
    epochs: int = field(default=10, metadata={"help": "Training epochs."})
    batch_size: int = field(default=32, metadata={"help": "Images per minibatch."})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate (momentum 0.9, weight decay 5e-4)."})
    momentum: float = 0.9  # paper: Caffe/AlexNet settings
    weight_decay: float = 5e-4
    seed: int = field(default=0, metadata={"help": "Seed of the head's init and of crops, flips, order and dropout."})

    def __post_init__(self) -> None:
        if not self.sizes or any(s < 32 for s in self.sizes):
            raise ValueError(f"sizes must be at least 32 pixels, got {self.sizes}")
        if max(self.sizes) > self.resize:
            raise ValueError(f"the crop ({max(self.sizes)}) cannot exceed the resized shorter side ({self.resize})")

    @property
    def crop(self) -> int:
        """The crop taken from the resized image (the largest size); smaller sizes resize it."""
        return max(self.sizes)


def epoch_size(epoch: int, sizes: Sequence[int]) -> int:
    """Input size of 0-based ``epoch``: the sizes in turn, one full epoch each (paper 2.3)."""
    return int(sizes[epoch % len(sizes)])


def build_classifier(settings: TrainSettings, num_classes: int) -> SPPClassifier:
    """A fresh classifier: the backbone's trunk with ``settings.weights``, a new head
    initialised from ``settings.seed``."""
    spec = get_backbone(settings.backbone)
    trunk = build_trunk(settings.backbone, settings.weights)
    torch.manual_seed(settings.seed)
    return SPPClassifier(
        trunk, spec.channels, num_classes, settings.levels, settings.hidden, settings.trainable_layers, settings.dropout
    )


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def make_batches(
    images: Sequence[np.ndarray], labels: np.ndarray, settings: TrainSettings, epoch: int
) -> Iterable[tuple[Tensor, Tensor]]:
    """This epoch's batches: ``(uint8 Tensor[B, 3, s, s] RGB, int8 Tensor[B, K] labels)`` with
    ``s = epoch_size(epoch)``: random ``crop`` squares of the pre-resized ``images``
    (``np.ndarray[H, W, 3]``, shorter side ``settings.resize``), flipped at random, resized
    to ``s`` when ``s`` is smaller than the crop."""
    gen = _generator(settings.seed, epoch)
    size, crop = epoch_size(epoch, settings.sizes), settings.crop
    order = torch.randperm(len(images), generator=gen).tolist()
    corner = torch.rand(len(images), 2, generator=gen).numpy()
    flip = (torch.rand(len(images), generator=gen) < 0.5).tolist()
    for start in range(0, len(order), settings.batch_size):
        chosen = order[start : start + settings.batch_size]
        crops = []
        for i in chosen:
            h, w = images[i].shape[:2]
            top, left = int(corner[i, 0] * (h - crop + 1)), int(corner[i, 1] * (w - crop + 1))
            patch = images[i][top : top + crop, left : left + crop]
            crops.append(patch[:, ::-1] if flip[i] else patch)
        batch = torch.from_numpy(np.ascontiguousarray(np.stack(crops))).permute(0, 3, 1, 2)  # [B, 3, crop, crop]
        if size != crop:  # paper 2.3: the 180 input is the 224 region resized
            batch = F.interpolate(batch.float(), size=(size, size), mode="bilinear", align_corners=False)
            batch = batch.round().clamp(0, 255).to(torch.uint8)
        yield batch, torch.from_numpy(labels[chosen])


def multilabel_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean binary cross-entropy over the (image, class) pairs whose label is not 0."""
    mask = (labels != 0).float()
    loss = F.binary_cross_entropy_with_logits(logits, (labels > 0).float(), weight=mask, reduction="sum")
    return loss / mask.sum().clamp(min=1)


def train_epoch(
    model: SPPClassifier,
    optimizer: torch.optim.Optimizer,
    norm: Normalization,
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    settings: TrainSettings,
    epoch: int,
    device: torch.device,
    progress: Progress | None = None,
) -> float:
    """One epoch at ``epoch_size(epoch)``; returns the mean training loss."""
    model.train()
    torch.manual_seed(settings.seed * 1_000_003 + epoch)  # dropout
    batches = make_batches(images, labels, settings, epoch)
    total_batches = -(-len(images) // settings.batch_size)
    losses = []
    for pixels, target in track(progress, batches, f"train epoch {epoch + 1}", total=total_batches):
        x = norm(pixels.to(device)).contiguous(memory_format=torch.channels_last)
        loss = multilabel_loss(model(x), target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else 0.0


@dataclass
class TrainState:
    """What a run returns: the model, per-epoch losses and input sizes, where it started."""

    model: SPPClassifier
    losses: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    resumed_from: int = 0


def run_training(
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    classes: Sequence[str],
    out: Path,
    settings: TrainSettings,
    norm: Normalization,
    device: torch.device,
    dataset: dict[str, object] | None = None,
    force: bool = False,
    stop_after: int | None = None,
    progress: Progress | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> TrainState:
    """Train (or resume training) in the stage folder ``out``.

    Args:
        images: ``np.ndarray[H, W, 3]`` uint8 RGB training images (any size; resized here).
        labels: ``np.ndarray[N, K]`` int8 in ``{1, 0, -1}``.
        out: stage folder: ``manifest.json``, ``checkpoint.pt`` after each epoch,
            ``model.pt`` (the final state_dict) and ``history.json`` at the end.
        stop_after: stop after this many epochs in total (an interrupted run, for tests).
        on_epoch: called with ``(epoch, size, mean loss)`` after each epoch.

    Raises:
        SettingsChanged: ``out`` holds a run with other settings and ``force`` is false.
    """
    out = Path(out)
    config = {**settings_config(settings), "classes": list(classes), "dataset": dataset or {}}
    open_stage(out, "train-spp-classifier", config, force=force)
    model = build_classifier(settings, len(classes)).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.trainable_parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    state = TrainState(model)
    checkpoint = out / CHECKPOINT
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.losses, state.sizes = list(saved["losses"]), list(saved["sizes"])
        state.resumed_from = int(saved["epoch"])
    resized = [resize_shorter_side(im, settings.resize) for im in images]
    last = settings.epochs if stop_after is None else min(stop_after, settings.epochs)
    for epoch in range(state.resumed_from, last):
        loss = train_epoch(model, optimizer, norm, resized, labels, settings, epoch, device, progress)
        state.losses.append(loss)
        state.sizes.append(epoch_size(epoch, settings.sizes))
        saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "losses": state.losses, "sizes": state.sizes}
        atomic_write(checkpoint, lambda tmp, s=saved: torch.save(s, tmp))
        if on_epoch:
            on_epoch(epoch, state.sizes[-1], loss)
    if len(state.losses) == settings.epochs:
        atomic_write(out / MODEL, lambda tmp: torch.save(model.state_dict(), tmp))
        history = {"losses": state.losses, "sizes": state.sizes}
        atomic_write(out / "history.json", lambda tmp: tmp.write_text(json.dumps(history, indent=2)))
    return state


def load_trained(folder: Path, settings: TrainSettings, num_classes: int, device: torch.device) -> SPPClassifier:
    """The finished model of a training folder (``model.pt``), in eval mode.

    Raises:
        FileNotFoundError: training has not finished (no ``model.pt``).
    """
    path = Path(folder) / MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MODEL} yet; rerun train-spp-classifier to finish training")
    model = build_classifier(settings, num_classes)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device, memory_format=torch.channels_last).eval()


@torch.inference_mode()
def predict(
    model: SPPClassifier,
    norm: Normalization,
    images: Iterable[np.ndarray],
    view: str,
    device: torch.device,
    size: int = 256,
    crop: int = 224,
    batch_size: int = 16,
) -> np.ndarray:
    """``np.ndarray[N, K]`` logits of ``images`` at a test view (paper Table 2): the shorter
    side resized to ``size``; ``crop``: its centre ``crop x crop``; ``full``: all of it."""
    model.eval()
    rows: dict[int, np.ndarray] = {}
    chunk: list[tuple[int, np.ndarray]] = []
    for index, image in enumerate(images):
        chunk.append((index, view_image(image, view, size, crop)))
        if len(chunk) == batch_size:
            rows.update(run_by_shape(model, norm, chunk, device))
            chunk = []
    rows.update(run_by_shape(model, norm, chunk, device))
    return np.stack([rows[i] for i in range(len(rows))]) if rows else np.zeros((0, 0), np.float32)
