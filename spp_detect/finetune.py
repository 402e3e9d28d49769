"""The finetune stage: fc6 -> fc7 -> fc8 trained on pooled SPP features from the cache.

As the release (``finetuning/spp_finetune_voc.m``, ``pascal_finetune_fc_spm_*.prototxt``,
FACTS 1.6), only the fc layers are trained; the conv maps come from the extract cache and
no conv layer runs. Sampling:

* minibatches of 128 windows, 25% foreground (``fg_fraction = 0.25``);
* foreground: max IoU >= 0.5 with a ground-truth box (ground-truth windows included, IoU
  1), labelled with that box's class (1..20);
* background: max IoU in [0.1, 0.5), label 0;
* each window pooled at a random scale of the cache (``opts.random_scale = 1``; at test
  time the scale is chosen by size);
* SGD, momentum 0.9, weight decay 5e-4, bias learning rate x2 (``blobs_lr 1 / 2``), the
  learning rate divided by 10 at each step (``lr_policy "vstep"``: 1e-3, 1e-4, 1e-5).

Batches are prepared a round at a time (the release prepared 500 iterations at once): the
round's windows are drawn with a generator seeded by ``(seed, round)``, pooled, and kept
in fp16; dropout is seeded by the round too. A checkpoint after every round holds the
weights, the momentum buffers and the iteration, so a resumed run continues to exactly
the state an uninterrupted one reaches.

What differs from the release, on purpose: fc6/fc7 start from random init (no
SPP-trained fc layers exist for the backbones on disk); no flipped images (cached maps
are of the unflipped image); no model selection on the test set (the release picked its
snapshot on VOC07 test, SPP_net#28): the last iterate is used.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from spp_detect.cache import FeatureCache
from spp_detect.datasets.voc import VOC_CLASSES
from spp_detect.head import SPPHead, save_head
from spp_detect.labels import class_overlaps
from spp_detect.stage_dir import atomic_write, open_stage_dir
from spp_detect.tensor_io import load_tensors, save_tensors
from spp_detect.window_features import TARGET_NORM, iter_images, mean_feature_norm, open_caches

__all__ = ["FinetuneSettings", "FinetuneSummary", "TrainingWindows", "collect_training_windows", "run_finetune"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.npz"


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything a fine-tuning run depends on (the stage's manifest key hashes it).

    Defaults are the release's (FACTS 1.6) except ``iterations``/``lr_steps`` (it ran
    3 x 30k iterations of 128 windows with ImageNet-trained fc layers to start from) and
    ``base_lr`` (0.01 rather than 1e-3, for randomly initialised fc6/fc7).
    """

    fc_dim: int = 4096
    iterations: int = 3000
    base_lr: float = 0.01
    lr_steps: tuple[int, ...] = (2000,)
    batch_size: int = 128  # release: 128 windows per minibatch
    fg_fraction: float = 0.25  # release: fg_fraction = 0.25
    fg_threshold: float = 0.5  # release: fg if max IoU >= 0.5
    bg_low: float = 0.1  # release: bg if max IoU in [0.1, 0.5)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    random_scale: bool = True  # release: opts.random_scale = 1
    round_iterations: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_steps", tuple(int(s) for s in self.lr_steps))
        if self.iterations < 1 or self.batch_size < 2 or self.round_iterations < 1:
            raise ValueError("iterations, batch_size and round_iterations must be positive")
        if not 0 < self.fg_fraction < 1:
            raise ValueError(f"fg_fraction must be in (0, 1), got {self.fg_fraction}")

    def lr_at(self, iteration: int) -> float:
        """Learning rate of ``iteration`` (0-based): ``base_lr / 10`` per step passed."""
        return self.base_lr * 0.1 ** sum(iteration >= s for s in self.lr_steps)


@dataclass
class TrainingWindows:
    """Fine-tuning candidates over all training images: parallel arrays of
    ``pairs`` (``(cache, image id)`` list), ``image [M]`` index into it, ``window [M]``
    index in that image, ``label [M]`` (0 = background)."""

    pairs: list[tuple[int, str]]
    fg_image: np.ndarray
    fg_window: np.ndarray
    fg_label: np.ndarray
    bg_image: np.ndarray
    bg_window: np.ndarray


def collect_training_windows(
    caches: Sequence[FeatureCache], fg_threshold: float = 0.5, bg_low: float = 0.1
) -> TrainingWindows:
    """Foreground and background windows of every image (maps are not decoded)."""
    pairs = [(i, im) for i, c in enumerate(caches) for im in c.image_ids]
    fg_image, fg_window, fg_label, bg_image, bg_window = [], [], [], [], []
    for n, (index, image_id) in enumerate(pairs):
        image = caches[index].load(image_id, with_maps=False)
        overlaps = class_overlaps(image.boxes, image.gt_boxes, image.gt_labels, len(VOC_CLASSES))
        best, cls = overlaps.max(dim=1)  # [N]
        fg = torch.nonzero(best >= fg_threshold).flatten()
        bg = torch.nonzero((best >= bg_low) & (best < fg_threshold)).flatten()
        fg_image.append(np.full(len(fg), n)), fg_window.append(fg.numpy()), fg_label.append(cls[fg].numpy() + 1)
        bg_image.append(np.full(len(bg), n)), bg_window.append(bg.numpy())
    cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
    return TrainingWindows(pairs, cat(fg_image), cat(fg_window), cat(fg_label), cat(bg_image), cat(bg_window))


@dataclass
class FinetuneSummary:
    iterations_run: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    rounds: list[dict[str, float]] = field(default_factory=list)
    already_done: bool = False


def _round_batches(
    caches: Sequence[FeatureCache],
    windows: TrainingWindows,
    settings: FinetuneSettings,
    round_index: int,
    iterations: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Pooled features ``Tensor[iterations * B, D]`` (fp16) and labels, laid out so that
    rows ``[i B, (i + 1) B)`` are minibatch ``i`` with exactly ``round(fg_fraction B)`` fg."""
    rng = np.random.default_rng([settings.seed, round_index])
    per_fg = round(settings.batch_size * settings.fg_fraction)
    per_bg = settings.batch_size - per_fg
    if len(windows.fg_image) == 0 or len(windows.bg_image) == 0:
        raise ValueError("the training caches hold no foreground or no background windows to fine-tune on")
    fg = rng.integers(0, len(windows.fg_image), iterations * per_fg)
    bg = rng.integers(0, len(windows.bg_image), iterations * per_bg)
    image = np.concatenate([windows.fg_image[fg], windows.bg_image[bg]])
    window = np.concatenate([windows.fg_window[fg], windows.bg_window[bg]])
    label = np.concatenate([windows.fg_label[fg], np.zeros(len(bg), np.int64)])
    # batch i takes fg rows i*per_fg.. and bg rows i*per_bg..; build the row order once
    order = np.concatenate(
        [np.concatenate([np.arange(i * per_fg, (i + 1) * per_fg), len(fg) + np.arange(i * per_bg, (i + 1) * per_bg)])
         for i in range(iterations)]
    )
    image, window, label = image[order], window[order], label[order]
    caches_dim = caches[0].feature_dim
    feats = torch.empty((len(image), caches_dim), dtype=torch.float16, device=device)
    for n in np.unique(image):
        rows = np.nonzero(image == n)[0]
        cached = caches[windows.pairs[n][0]].load(windows.pairs[n][1])
        idx = torch.from_numpy(window[rows])
        scale = None
        if settings.random_scale and len(cached.maps) > 1:
            scale = torch.from_numpy(rng.integers(0, len(cached.maps), len(rows)))
        feats[torch.from_numpy(rows).to(device)] = cached.features(idx, device, scale_index=scale).half()
    return feats, torch.from_numpy(label).to(device)


def _optimizer(head: SPPHead, settings: FinetuneSettings) -> torch.optim.SGD:
    weights = [p for n, p in head.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in head.named_parameters() if n.endswith("bias")]
    return torch.optim.SGD(
        [
            {"params": weights, "lr_mult": 1.0, "weight_decay": settings.weight_decay},
            {"params": biases, "lr_mult": 2.0, "weight_decay": 0.0},  # blobs_lr 1 / 2 (Caffe)
        ],
        lr=settings.base_lr,
        momentum=settings.momentum,
    )


def _save_checkpoint(out: Path, head: SPPHead, optimizer: torch.optim.SGD, iteration: int) -> None:
    tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in head.state_dict().items()}
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            buf = optimizer.state.get(param, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{group_index}.{param_index}"] = buf
    tensors["iteration"] = torch.tensor(iteration)
    save_tensors(out / CHECKPOINT, tensors)


def _load_checkpoint(out: Path, head: SPPHead, optimizer: torch.optim.SGD) -> int:
    tensors = load_tensors(out / CHECKPOINT)
    head.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    device = next(head.parameters()).device
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            buf = tensors.get(f"momentum.{group_index}.{param_index}")
            if buf is not None:
                optimizer.state[param]["momentum_buffer"] = buf.to(device)
    return int(tensors["iteration"])


def run_finetune(
    cache_folders: Sequence[Path | str],
    out: Path | str,
    settings: FinetuneSettings,
    *,
    device: torch.device | str = "cpu",
    force: bool = False,
    stop_after: int | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> FinetuneSummary:
    """Fine-tune fc6-fc8 on the windows of ``cache_folders``; write ``<out>/head.npz``.

    Args:
        cache_folders: one or more extract caches (e.g. VOC07 trainval and VOC12 trainval).
        out: the stage folder (manifest, ``checkpoint.npz`` while running, then ``head.npz``,
            ``head.json`` and ``train_log.json``).
        settings: :class:`FinetuneSettings`.
        device: where the head trains and windows are pooled.
        force: start over even if ``out`` holds another run.
        stop_after: stop (with a checkpoint) once this many iterations are done in total,
            rounded up to a whole round; a later call resumes. For tests and time-boxed runs.
        progress: ``progress(total, start)`` returns a tqdm-like bar (``update``,
            ``set_postfix``, ``close``), or None for no bar.

    Raises:
        SettingsChanged: ``out`` holds a run with other settings and ``force`` is false.
        ValueError: caches that cannot be mixed, or no fg/bg windows.
    """
    out = Path(out)
    device = torch.device(device)
    caches = open_caches(cache_folders)
    config = {"settings": asdict(settings), "caches": [c.key for c in caches]}
    open_stage_dir(out, "finetune", config, force=force)
    summary = FinetuneSummary()
    if (out / "head.npz").is_file():
        summary.already_done = True
        return summary

    torch.manual_seed(settings.seed)  # initial weights
    scale = TARGET_NORM / mean_feature_norm(caches, "pool", seed=settings.seed, device=device)
    head = SPPHead(caches[0].feature_dim, settings.fc_dim, len(VOC_CLASSES) + 1, input_scale=scale).to(device)
    optimizer = _optimizer(head, settings)
    iteration = 0
    if (out / CHECKPOINT).is_file():
        iteration = _load_checkpoint(out, head, optimizer)
        summary.resumed_from = iteration
    log_path = out / "train_log.json"
    rounds = json.loads(log_path.read_text()) if iteration and log_path.is_file() else []
    rounds = [r for r in rounds if r["iteration"] <= iteration]
    windows = collect_training_windows(caches, settings.fg_threshold, settings.bg_low)
    log.info(
        "finetune: %d images, %d fg / %d bg candidate windows, input scale %.4g",
        len(windows.pairs), len(windows.fg_image), len(windows.bg_image), scale,
    )
    end = settings.iterations if stop_after is None else min(settings.iterations, stop_after)
    bar = progress(settings.iterations, iteration) if progress else None
    loss_fn = nn.CrossEntropyLoss()
    start_time = time.perf_counter()
    head.train()
    while iteration < end:
        round_index = iteration // settings.round_iterations
        count = min(settings.round_iterations * (round_index + 1), settings.iterations) - iteration
        feats, labels = _round_batches(caches, windows, settings, round_index, count, device)
        torch.manual_seed(settings.seed * 1_000_003 + round_index)  # dropout masks of this round
        losses, fg_hits, fg_total = [], 0, 0
        for i in range(count):
            rows = slice(i * settings.batch_size, (i + 1) * settings.batch_size)
            lr = settings.lr_at(iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            logits = head(feats[rows].float())
            loss = loss_fn(logits, labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iteration += 1
            fg = labels[rows] > 0
            fg_hits += int((logits.argmax(1)[fg] == labels[rows][fg]).sum())
            fg_total += int(fg.sum())
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", fg_acc=f"{fg_hits / max(fg_total, 1):.2f}", lr=f"{lr:g}")
        rounds.append({"iteration": iteration, "loss": float(np.mean(losses)), "fg_accuracy": fg_hits / max(fg_total, 1)})
        _save_checkpoint(out, head, optimizer, iteration)
        atomic_write(log_path, lambda p: p.write_text(json.dumps(rounds, indent=1)))
        summary.iterations_run += count
    if bar is not None:
        bar.close()
    summary.seconds = time.perf_counter() - start_time
    summary.rounds = rounds
    if iteration >= settings.iterations:
        save_head(out, head.eval())
        (out / CHECKPOINT).unlink(missing_ok=True)
    return summary
