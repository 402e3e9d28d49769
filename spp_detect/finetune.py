"""The finetune stage: fc6 -> fc7 -> fc8 trained on pooled SPP features from the cache.

As the release (``finetuning/spp_finetune_voc.m``, ``pascal_finetune_fc_spm_*.prototxt``,
docs/sources.md 1.6), only the fc layers are trained; the conv maps come from the extract cache and
no conv layer runs. Sampling:

* minibatches of 128 windows, 25% foreground (``fg_fraction = 0.25``);
* foreground: max IoU >= 0.5 with a ground-truth box (ground-truth windows included, IoU
  1), labelled with that box's class (1..20);
* background: max IoU in [0.1, 0.5), label 0;
* each window pooled at a random scale of the cache (``opts.random_scale = 1``; at test
  time the scale is chosen by size);
* SGD, momentum 0.9, weight decay 5e-4, bias learning rate x2 (``blobs_lr 1 / 2``), the
  learning rate divided by 10 at each step (``lr_policy "vstep"``: 1e-3, 1e-4, 1e-5).

Minibatches are drawn a round at a time (the release prepared 500 iterations at once): the
round's windows are drawn with a generator seeded by ``(seed, round)``. The draws do not
depend on the model, so they are pooled a *pass* of several rounds at once (as many as
their fp16 rows fit in :func:`pass_budget`), each image drawn in the pass decoded once, at
the scales its rows use, instead of every round; the pooled rows are kept in fp16 until
their round comes. The dropout masks of each minibatch come from a generator seeded by
``(seed, iteration)``. Under ``torchrun`` the minibatches are split over the processes
(DistributedDataParallel, :func:`run_finetune`) with the same result as one process. A checkpoint after every round holds the
weights, the momentum buffers and the iteration, so a resumed run continues to exactly
the state an uninterrupted one reaches.

What differs from the release, on purpose: fc6/fc7 start from random init (no
SPP-trained fc layers exist for the backbones on disk; ``init_head`` starts from another
finetune folder's head); no model selection on the test set (the release picked its
snapshot on VOC07 test, SPP_net#28): the last iterate is used. Flipped images are given as
``extract --flip`` caches beside the plain ones, as the release's ``flip_finetune``.

Beyond the paper, ``train_from`` names the first trunk layer to train: the trunk then runs
forward and backward through SPP on image-centric minibatches (Fast R-CNN's training,
:mod:`spp_detect.conv_finetune`), and the fine-tuned trunk is written beside the head
(``trunk.pth``; ``extract --head`` computes caches with it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from spp_detect.background_io import Waited, read_ahead
from spp_detect.cache import FeatureCache
from spp_detect.conv_finetune import FC_ONLY
from spp_detect.device import canonical_device
from spp_detect.head import DROPOUT, SPPHead, load_head, save_head
from spp_detect.labels import class_overlaps
from spp_detect.stage_dir import BadSetting, Progress, atomic_write, open_stage, settings_config, track
from spp_detect.tensor_io import load_tensors, save_tensors
from spp_detect.window_features import TARGET_NORM, mean_feature_norm, open_caches

__all__ = ["FinetuneSettings", "FinetuneSummary", "TrainingWindows", "collect_training_windows", "run_finetune"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.npz"


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything a fine-tuning run depends on (the stage's manifest key hashes it).

    Defaults are the release's (docs/sources.md 1.6) except ``iterations``/``lr_steps`` (it ran
    3 x 30k iterations of 128 windows with ImageNet-trained fc layers to start from) and
    ``base_lr`` (0.01 rather than 1e-3, for randomly initialised fc6/fc7).
    """

    fc_dim: int = field(default=4096, metadata={"help": (
        "Width of fc6 and fc7 (paper: 4096; 1024 is about 4x faster on a CPU).")})
    iterations: int = field(default=3000, metadata={"help": "Minibatches of --batch-size windows (release: 3 x 30k)."})
    base_lr: float = field(default=0.01, metadata={"help": (
        "Base learning rate (release: 1e-3 from ImageNet-trained fc layers; fc6/fc7 are random here).")})
    lr_steps: tuple[int, ...] = field(default=(2000,), metadata={"help": (
        "Iterations at which the learning rate is divided by 10 (release: 30000,60000).")})
    batch_size: int = field(default=128, metadata={"help": (  # release: 128 windows per minibatch
        "Windows per minibatch (release: 128).")})
    fg_fraction: float = field(default=0.25, metadata={"help": (  # release: fg_fraction = 0.25
        "Share of foreground windows per minibatch (release: 0.25).")})
    fg_threshold: float = 0.5  # release: fg if max IoU >= 0.5
    bg_low: float = 0.1  # release: bg if max IoU in [0.1, 0.5)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    random_scale: bool = field(default=True, metadata={"help": (  # release: opts.random_scale = 1
        "Pool each training window at a random scale (release: random_scale = 1).")})
    round_iterations: int = field(default=100, metadata={"help": (
        "Minibatches prepared at once; a checkpoint follows each round.")})
    seed: int = field(default=0, metadata={"help": "Seed of the initial weights, window sampling and dropout."})
    train_from: str = field(default=FC_ONLY, metadata={"help": (
        "First layer trained: 'fc6' (the paper: fc layers only, on cached features) or a trunk layer "
        "(SqueezeNet: conv1, fire2 .. fire9; any backbone: its layer index), trained through SPP on "
        "minibatches of --images-per-batch images (Fast R-CNN; e.g. fire5). Needs the images the caches record.")})
    images_per_batch: int = field(default=2, metadata={"help": (  # Fast R-CNN 2.3: N = 2 images, R = 128
        "Images per minibatch when training the trunk; --batch-size windows are split over them (Fast R-CNN: 2).")})
    train_scales: tuple[int, ...] = field(default=(), metadata={"help": (
        "Shorter-side scales an image is trained at when training the trunk, one drawn per image "
        "(default: the caches' scales).")})

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_steps", tuple(int(s) for s in self.lr_steps))
        object.__setattr__(self, "train_scales", tuple(int(s) for s in self.train_scales))
        if self.iterations < 1 or self.batch_size < 2 or self.round_iterations < 1 or self.images_per_batch < 1:
            raise ValueError("iterations, batch_size, round_iterations and images_per_batch must be positive")
        if self.batch_size % self.images_per_batch:
            raise ValueError(f"batch_size {self.batch_size} must split evenly over {self.images_per_batch} images")
        if not 0 < self.fg_fraction < 1:
            raise ValueError(f"fg_fraction must be in (0, 1), got {self.fg_fraction}")

    def lr_at(self, iteration: int) -> float:
        """Learning rate of ``iteration`` (0-based): ``base_lr / 10`` per step passed."""
        return self.base_lr * 0.1 ** sum(iteration >= s for s in self.lr_steps)


@dataclass
class TrainingWindows:
    """Fine-tuning candidates over all training images: ``pairs`` (``(cache, image id)``
    list) and, for the fg and for the bg windows, parallel arrays of ``image [M]`` index
    into it, ``window [M]`` index in that image, ``label [M]`` (fg only; bg is 0) and
    ``scale [M]`` the window's own scale index (extract's choice by size)."""

    pairs: list[tuple[int, str]]
    fg_image: np.ndarray
    fg_window: np.ndarray
    fg_label: np.ndarray
    fg_scale: np.ndarray
    bg_image: np.ndarray
    bg_window: np.ndarray
    bg_scale: np.ndarray


def collect_training_windows(
    caches: Sequence[FeatureCache], fg_threshold: float = 0.5, bg_low: float = 0.1
) -> TrainingWindows:
    """Foreground and background windows of every image (maps are not decoded)."""
    pairs = [(i, im) for i, c in enumerate(caches) for im in c.image_ids]
    fg_image, fg_window, fg_label, fg_scale, bg_image, bg_window, bg_scale = [], [], [], [], [], [], []
    for n, (index, image_id) in enumerate(pairs):
        image = caches[index].load(image_id, scales=())
        overlaps = class_overlaps(image.boxes, image.gt_boxes, image.gt_labels, len(caches[index].classes))
        best, cls = overlaps.max(dim=1)  # [N]
        fg = torch.nonzero(best >= fg_threshold).flatten()
        bg = torch.nonzero((best >= bg_low) & (best < fg_threshold)).flatten()
        fg_image.append(np.full(len(fg), n)), fg_window.append(fg.numpy()), fg_label.append(cls[fg].numpy() + 1)
        bg_image.append(np.full(len(bg), n)), bg_window.append(bg.numpy())
        fg_scale.append(image.scale_index[fg].numpy()), bg_scale.append(image.scale_index[bg].numpy())
    cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
    return TrainingWindows(pairs, cat(fg_image), cat(fg_window), cat(fg_label), cat(fg_scale), cat(bg_image),
                           cat(bg_window), cat(bg_scale))


@dataclass
class FinetuneSummary:
    iterations_run: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    rounds: list[dict[str, float]] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)  # wall seconds of each round this call ran
    already_done: bool = False
    processes: int = 1  # torchrun's world size
    #: fc-only training: one entry per pass this call pooled (:meth:`_FcTraining.pool_pass`)
    passes: list[dict[str, float]] = field(default_factory=list)

    @property
    def seconds_per_iteration(self) -> float | None:
        """Mean wall seconds per iteration over the rounds this call ran (None if none)."""
        return self.seconds / self.iterations_run if self.iterations_run else None

    def describe(self, out: Path | str) -> str:
        """One line for the command line about the run into ``out``."""
        if self.already_done:
            return f"finetune: {out} already holds the trained head (use --force to retrain)"
        last = self.rounds[-1] if self.rounds else {}
        state = "done" if (Path(out) / "head.npz").is_file() else "stopped (rerun to continue)"
        return (f"finetune: {self.iterations_run} iterations in {self.seconds:.0f} s"
                + (f" (resumed at {self.resumed_from})" if self.resumed_from else "")
                + f", last round loss {last.get('loss', float('nan')):.3f}, fg accuracy {last.get('fg_accuracy', 0):.2f}; "
                f"{state} -> {out}" + (f" on {self.processes} processes" if self.processes > 1 else ""))


@dataclass
class _Rows:
    """This process's rows of one or more rounds' minibatches, drawn (:func:`_draw_round`)
    but not pooled: parallel arrays ``[R]`` of ``image`` (index into
    :attr:`TrainingWindows.pairs`), ``window`` (index in that image), ``label`` (0 =
    background), ``scale`` (the scale index the row is pooled at) and ``random`` (whether
    that scale was drawn at random, else it is the window's own)."""

    image: np.ndarray
    window: np.ndarray
    label: np.ndarray
    scale: np.ndarray
    random: np.ndarray

    @staticmethod
    def cat(parts: Sequence["_Rows"]) -> "_Rows":
        fields = ("image", "window", "label", "scale", "random")
        return _Rows(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def _draw_round(
    caches: Sequence[FeatureCache],
    windows: TrainingWindows,
    settings: FinetuneSettings,
    round_index: int,
    iterations: int,
    rank: int = 0,
    world_size: int = 1,
) -> _Rows:
    """This process's rows of a round's ``iterations`` minibatches (nothing decoded).

    The round's windows (and each window's random scale) are drawn from a generator
    seeded by ``(seed, round)``, identically in every process; minibatch ``i`` is rows
    ``[i B, (i + 1) B)`` of that draw, with exactly ``round(fg_fraction B)`` fg first.
    Process ``rank`` of ``world_size`` keeps rows ``rank::world_size`` of each minibatch,
    so it gets ``iterations * b`` rows with ``b = len(range(rank, B, world_size))``,
    minibatch ``i`` at rows ``[i b, (i + 1) b)``.
    """
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
    own = np.concatenate([windows.fg_scale[fg], windows.bg_scale[bg]])
    # batch i takes fg rows i*per_fg.. and bg rows i*per_bg..; build the row order once
    batches = np.arange(iterations)[:, None]
    order = np.concatenate(
        [batches * per_fg + np.arange(per_fg), len(fg) + batches * per_bg + np.arange(per_bg)], axis=1
    ).ravel()
    image, window, label, own = image[order], window[order], label[order], own[order]
    uniform = rng.random(len(image))  # each row's random scale, drawn for all rows in every process
    mine = (batches * settings.batch_size + np.arange(rank, settings.batch_size, world_size)).ravel()
    image, window, label, own, uniform = image[mine], window[mine], label[mine], own[mine], uniform[mine]
    num_scales = np.array([len(caches[c].scales) for c, _ in windows.pairs], dtype=np.int64)[image]  # [R]
    random = np.full(len(image), settings.random_scale) & (num_scales > 1)
    pick = np.minimum((uniform * num_scales).astype(np.int64), num_scales - 1)
    return _Rows(image, window, label, np.where(random, pick, own), random)


#: Rows pooled at once (in float32, then stored in fp16): 100 MB at 25,600-d.
_POOL_ROWS = 1024

#: Threads decoding a pass's images while the caller pools (``zlib.decompress`` and the
#: fp16 -> fp32 copy release the GIL), on every device. Measured on a 2-core CPU with other
#: jobs running, a 5-scale pass of 200 images (38,400 rows) in alternated runs: 65-67 s
#: decoding in turn, 40-45 s with one thread, 34-37 s with two.
DECODE_THREADS = 2


@dataclass
class _PooledRows:
    """Pooled rows (:func:`_pool_rows`), stored image by image: row ``i``'s features are
    ``features[position[i]]``.

    Attributes:
        features: ``Tensor[R, D]`` fp16 on the training device, in image order.
        position: ``Tensor[R]`` int64 on that device, each row's place in ``features``.
        labels: ``Tensor[R]`` int64 on that device, in row order (0 = background).
    """

    features: Tensor
    position: Tensor
    labels: Tensor

    def rows(self, rows: slice) -> tuple[Tensor, Tensor]:
        """Features ``Tensor[n, D]`` (fp16) and labels ``Tensor[n]`` of rows ``rows``, in row order."""
        return self.features.index_select(0, self.position[rows]), self.labels[rows]


def _pool_rows(
    caches: Sequence[FeatureCache],
    windows: TrainingWindows,
    rows: _Rows,
    device: torch.device,
    stats: dict[str, float] | None = None,
) -> _PooledRows:
    """Pool ``rows`` on ``device``, keeping the features in fp16.

    Each image of ``rows`` is decoded once, only at the scales its rows are pooled at, in
    :data:`DECODE_THREADS` background threads (:func:`spp_detect.background_io.read_ahead`),
    and all its rows are pooled at once, grouped by scale, into consecutive rows of the
    store (no scattered writes). Pooling is a max per row, so a row's features do not
    depend on which other rows are pooled with it, nor on the order. ``stats`` gets ``images``,
    ``decode_seconds`` (reading and decoding, summed over the images) and
    ``waited_seconds`` (the time pooling waited for decoded images).
    """
    features = torch.empty((len(rows.image), caches[0].feature_dim), dtype=torch.float16, device=device)
    order = np.lexsort((rows.scale, rows.image))  # [R] the rows image by image, each image's by scale
    images, starts = np.unique(rows.image[order], return_index=True)
    bounds = np.append(starts, len(order))  # image j's rows are order[bounds[j]:bounds[j + 1]]
    decode_seconds = [0.0] * len(images)  # each image's, written by the thread that decodes it

    def load(j: int):
        start = time.perf_counter()
        cache_index, image_id = windows.pairs[images[j]]
        scales = np.unique(rows.scale[order[bounds[j]:bounds[j + 1]]]).tolist()
        cached = caches[cache_index].load(image_id, scales=scales).to(device)
        decode_seconds[j] = time.perf_counter() - start
        return cached

    waited = Waited()
    buffer = torch.empty((min(_POOL_ROWS, len(rows.image)), caches[0].feature_dim), device=device)  # float32
    for j, cached in read_ahead(range(len(images)), load, background=True, threads=DECODE_THREADS, waited=waited):
        random = bool(rows.random[order[bounds[j]]])  # one cache: all of the image's rows or none
        for first in range(bounds[j], bounds[j + 1], _POOL_ROWS):
            last = min(first + _POOL_ROWS, bounds[j + 1])
            mine = order[first:last]
            scale = torch.from_numpy(rows.scale[mine]) if random else None
            pooled = cached.features(torch.from_numpy(rows.window[mine]), device, scale_index=scale, out=buffer)
            features[first:last].copy_(pooled)  # rounded to fp16
    if stats is not None:
        stats.update(images=len(images), decode_seconds=sum(decode_seconds), waited_seconds=waited.seconds)
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    return _PooledRows(features, torch.from_numpy(position).to(device), torch.from_numpy(rows.label).to(device))


def pass_budget(device: torch.device) -> int:
    """Bytes the pooled fp16 rows of a fine-tuning pass may take on ``device``: half its free
    memory on a GPU, a quarter of the available RAM on the CPU (0 where the system does not
    say: a pass is then one round)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 2
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 0


def _dropout_masks(settings: FinetuneSettings, iteration: int, device: torch.device, rank: int, world_size: int) -> Tensor:
    """``Tensor[2, b, fc_dim]``: this process's rows ``rank::world_size`` of the dropout masks
    (after fc6 and fc7) of minibatch ``iteration``, drawn for the whole minibatch from a
    generator seeded by ``(seed, iteration)``: equal to one process's masks."""
    generator = torch.Generator(device=device).manual_seed(settings.seed * 1_000_003 + iteration)
    keep = torch.rand((2, settings.batch_size, settings.fc_dim), generator=generator, device=device) >= DROPOUT
    return keep[:, rank::world_size].float() / (1.0 - DROPOUT)


def _optimizer(module: nn.Module, settings: FinetuneSettings) -> torch.optim.SGD:
    """SGD over ``module``'s trainable parameters: weights with weight decay, biases at twice
    the learning rate without it (Caffe's ``blobs_lr 1 / 2``, ``weight_decay 1 / 0``)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    weights = [p for n, p in named if not n.endswith("bias")]
    biases = [p for n, p in named if n.endswith("bias")]
    # fused: weight decay, momentum and the update in one pass over each parameter (the same
    # rule); unfused SGD allocates and writes fc6's 26M weights three more times per step,
    # 60 ms of a 200 ms minibatch on a 2-core CPU (10 ms fused)
    fused = all(p.device.type in ("cpu", "cuda") for _, p in named)
    return torch.optim.SGD(
        [
            {"params": weights, "lr_mult": 1.0, "weight_decay": settings.weight_decay},
            {"params": biases, "lr_mult": 2.0, "weight_decay": 0.0},  # blobs_lr 1 / 2 (Caffe)
        ],
        lr=settings.base_lr,
        momentum=settings.momentum,
        fused=fused or None,
    )


def _save_checkpoint(out: Path, module: nn.Module, optimizer: torch.optim.SGD, iteration: int) -> None:
    tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in module.state_dict().items()}
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            buf = optimizer.state.get(param, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{group_index}.{param_index}"] = buf
    tensors["iteration"] = torch.tensor(iteration)
    save_tensors(out / CHECKPOINT, tensors)


def _load_checkpoint(out: Path, module: nn.Module, optimizer: torch.optim.SGD) -> int:
    tensors = load_tensors(out / CHECKPOINT)
    module.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    device = next(module.parameters()).device
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            buf = tensors.get(f"momentum.{group_index}.{param_index}")
            if buf is not None:
                # in the parameter's own layout (a channels-last conv weight): the fused step
                # walks parameter, gradient and buffer in memory order
                optimizer.state[param]["momentum_buffer"] = torch.empty_like(param).copy_(buf.to(device))
    return int(tensors["iteration"])


def _set_lr(optimizer: torch.optim.SGD, settings: FinetuneSettings, iteration: int) -> float:
    lr = settings.lr_at(iteration)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    return lr


def trunk_weights_for(caches: Sequence[FeatureCache], weights: str | Path | None) -> str:
    """The weights the caches' trunk was built from, as :func:`spp_detect.backbones.build_model`
    takes them: ``imagenet`` / ``none`` as recorded, else ``weights``, a file that must be the
    one the caches record (by SHA-256).

    Raises:
        ValueError: a weights file is needed and not given, or is another file.
    """
    from spp_detect.stage_dir import weights_identity

    recorded = caches[0].weights
    if recorded in ("imagenet", "none"):
        return recorded
    if weights is None:
        raise ValueError(f"{caches[0].folder} was extracted with the weights file of {recorded}: training the trunk "
                         "starts from that file, give it (--weights FILE)")
    if weights_identity(str(weights)) != recorded:
        raise ValueError(f"{weights} is not the weights file {caches[0].folder} was extracted with ({recorded})")
    return str(weights)


def round_count(settings: FinetuneSettings, round_index: int) -> int:
    """Minibatches of round ``round_index``: ``round_iterations``, the last one of the run
    (at ``settings.iterations``) possibly fewer."""
    ri = settings.round_iterations
    return min(ri * (round_index + 1), settings.iterations) - ri * round_index


class _FcTraining:
    """The paper's fine-tuning: fc6-fc8 on windows pooled from the cached maps.

    Rounds are drawn as :func:`_draw_round` says and pooled a pass at a time
    (:meth:`pool_pass`): when a round starts whose rows are not pooled yet, it and the next
    rounds, ``rounds_per_pass`` in all (as many as :func:`pass_budget` holds, at least one,
    none beyond ``end``), are pooled at once. A resumed run starts a new pass at its round:
    the rows are the same whatever the passes, so is the result.
    """

    def __init__(self, caches, settings: FinetuneSettings, head: SPPHead, device, rank: int, world_size: int,
                 end: int) -> None:
        """``end``: the iteration the run stops at (its last round is the one holding ``end - 1``)."""
        self.caches, self.settings, self.device, self.rank, self.world_size = caches, settings, device, rank, world_size
        self.module: nn.Module = head
        self.windows = collect_training_windows(caches, settings.fg_threshold, settings.bg_low)
        self.last_round = (end - 1) // settings.round_iterations
        self.local = len(range(rank, settings.batch_size, world_size))  # this process's rows of each minibatch
        round_bytes = settings.round_iterations * self.local * caches[0].feature_dim * 2  # fp16 rows
        self.rounds_per_pass = max(1, pass_budget(canonical_device(device)) // round_bytes)
        self.passes: list[dict[str, float]] = []
        self._pass: _PooledRows | None = None
        self._rounds: dict[int, int] = {}  # round -> its first row in the pass

    def pool_pass(self, first: int) -> None:
        """Draw and pool rounds ``first ..`` (``rounds_per_pass`` of them, up to the last
        round of the run), replacing the previous pass; records its entry in :attr:`passes`."""
        start = time.perf_counter()
        self._pass, self._rounds = None, {}  # the previous pass's memory goes first
        rounds = range(first, min(first + self.rounds_per_pass, self.last_round + 1))
        drawn = [_draw_round(self.caches, self.windows, self.settings, r, round_count(self.settings, r), self.rank,
                             self.world_size) for r in rounds]
        stats: dict[str, float] = {}
        self._pass = _pool_rows(self.caches, self.windows, _Rows.cat(drawn), self.device, stats)
        bounds = np.cumsum([0] + [len(d.image) for d in drawn])
        self._rounds = dict(zip(rounds, bounds[:-1].tolist()))
        entry = {"first_round": first, "rounds": len(rounds), "rows": int(bounds[-1]), **stats,
                 "seconds": time.perf_counter() - start}
        self.passes.append(entry)
        log.info("finetune: pooled rounds %d-%d (%d rows of %d images) in %.1f s, %.1f s of it waiting for maps",
                 first, rounds[-1], entry["rows"], entry["images"], entry["seconds"], entry["waited_seconds"])

    def start_round(self, round_index: int, count: int) -> None:
        if round_index not in self._rounds:
            self.pool_pass(round_index)
        assert count == round_count(self.settings, round_index), "rounds start at multiples of round_iterations"
        self.first_row = self._rounds[round_index]
        self.first = round_index * self.settings.round_iterations

    def step(self, model: nn.Module, iteration: int) -> tuple[Tensor, Tensor, float]:
        """``(logits, labels, loss multiplier)`` of this process's rows of minibatch ``iteration``."""
        start = self.first_row + (iteration - self.first) * self.local
        feats, labels = self._pass.rows(slice(start, start + self.local))
        masks = _dropout_masks(self.settings, iteration, self.device, self.rank, self.world_size)
        logits = model(feats.float(), dropout_masks=masks)
        # mean over the whole minibatch: DDP averages over processes, so scale by world_size
        return logits, labels, self.world_size / self.settings.batch_size


class _ConvTraining:
    """Fast R-CNN's training through SPP (:mod:`spp_detect.conv_finetune`): each minibatch
    ``images_per_batch`` images, their trunk forward and backward, windows pooled from
    their maps; process ``rank`` runs the minibatch's images ``rank::world_size``."""

    def __init__(self, caches, settings: FinetuneSettings, head: SPPHead, weights: str, device, rank: int,
                 world_size: int) -> None:
        from spp_detect.backbones import NORMALIZATIONS
        from spp_detect.conv_finetune import build_conv_detector, cache_image_paths

        if settings.images_per_batch < world_size:
            raise ValueError(f"{settings.images_per_batch} images per minibatch cannot be split over {world_size} processes")
        self.caches, self.settings, self.device, self.rank, self.world_size = caches, settings, device, rank, world_size
        self.paths = [cache_image_paths(c) for c in caches]
        self.windows = collect_training_windows(caches, settings.fg_threshold, settings.bg_low)
        missing = [im for c, im in self.windows.pairs if im not in self.paths[c]]
        if missing:
            raise ValueError(f"the caches record no image file for {len(missing)} image(s), e.g. {missing[:3]}: rerun extract")
        self.norm = NORMALIZATIONS[caches[0].manifest["config"]["input_norm"]]
        self.scales = settings.train_scales or caches[0].scales
        self.detector, self.model = build_conv_detector(caches[0].backbone, weights, settings.train_from, head,
                                                        caches[0].levels, device)
        self.module: nn.Module = self.detector
        num = len(self.windows.pairs)
        split = lambda image, values: np.split(values[np.argsort(image, kind="stable")],  # noqa: E731
                                               np.cumsum(np.bincount(image, minlength=num))[:-1])
        self.fg = split(self.windows.fg_image, self.windows.fg_window)
        self.fg_label = split(self.windows.fg_image, self.windows.fg_label)
        self.bg = split(self.windows.bg_image, self.windows.bg_window)
        self.passes: list[dict[str, float]] = []  # none: every minibatch runs the trunk on its images

    def start_round(self, round_index: int, count: int) -> None:
        pass

    def step(self, model: nn.Module, iteration: int) -> tuple[Tensor, Tensor, float]:
        from spp_detect.conv_finetune import dropout_masks, image_minibatch, load_training_pixels, scaled_input

        s = self.settings
        batch = image_minibatch(self.fg, self.bg, self.fg_label, iteration, s.seed, s.images_per_batch,
                                s.batch_size // s.images_per_batch, s.fg_fraction, self.scales)
        total = sum(len(b.window) for b in batch)
        masks = dropout_masks(s.seed, iteration, total, s.fc_dim, self.device)
        starts = np.cumsum([0] + [len(b.window) for b in batch])
        inputs, boxes, factors, rows, labels = [], [], [], [], []
        for j in range(self.rank, len(batch), self.world_size):
            b = batch[j]
            cache_index, image_id = self.windows.pairs[b.pair]
            cache = self.caches[cache_index]
            cached = cache.load(image_id, scales=())
            pixels = load_training_pixels(cache, self.paths[cache_index][image_id], cached.width, cached.height)
            x, factor = scaled_input(pixels, b.scale, self.norm, self.device)
            inputs.append(x), factors.append(factor), boxes.append(cached.boxes[torch.from_numpy(b.window)])
            rows.append(torch.arange(starts[j], starts[j + 1])), labels.append(torch.from_numpy(b.label))
        mine = torch.cat(rows).to(self.device)
        logits = model(inputs, boxes, factors, masks[:, mine])
        return logits, torch.cat(labels).to(self.device), self.world_size / total


def run_finetune(
    cache_folders: Sequence[Path | str],
    out: Path | str,
    settings: FinetuneSettings,
    *,
    device: torch.device | str = "cpu",
    force: bool = False,
    stop_after: int | None = None,
    progress: Progress | None = None,
    rank: int = 0,
    world_size: int = 1,
    weights: str | Path | None = None,
    init_head: Path | str | None = None,
) -> FinetuneSummary:
    """Fine-tune fc6-fc8 (and, with ``settings.train_from``, the trunk from that layer) on
    the windows of ``cache_folders``; write ``<out>/head.npz`` (and ``trunk.pth``).

    Data-parallel when ``world_size > 1`` (the caller has joined the process group, e.g.
    :func:`spp_detect.distributed.init_process_group` under torchrun): every process draws
    the minibatches alike and runs its share (fc-only: rows ``rank::world_size`` of each;
    trunk training: images ``rank::world_size``), and DistributedDataParallel averages the
    gradients. Each process's loss is its share of the sum over the whole minibatch divided
    by the minibatch's windows (times ``world_size``, which the averaging undoes), and the
    dropout masks are drawn per minibatch, so N processes compute what one does, up to
    floating-point order. Only rank 0 writes the checkpoint, log and head; all ranks resume
    from the same checkpoint (a folder all of them can read).

    Args:
        cache_folders: one or more extract caches (e.g. VOC07 trainval and VOC12 trainval).
        out: the stage folder (manifest, ``checkpoint.npz`` while running, then ``head.npz``,
            ``head.json``, ``train_log.json``; with a trained trunk ``trunk.pth`` and ``trunk.json``).
        settings: :class:`FinetuneSettings`.
        device: where the head (and trunk) train and windows are pooled.
        force: start over even if ``out`` holds another run.
        stop_after: stop (with a checkpoint) once this many iterations are done in total,
            rounded up to a whole round; a later call resumes. For tests and time-boxed runs.
        progress: the progress protocol (:class:`spp_detect.stage_dir.Progress`), over the
            iterations (rank 0 only; the loss and learning rate go to its ``set_postfix``), or None.
        rank, world_size: this process's place in the data-parallel group.
        weights: the weights file the caches were extracted with, when trunk training starts
            from a file (checked by SHA-256); not needed for ``imagenet``.
        init_head: a finetune folder whose fc6-fc8 (and input scale) the head starts from
            instead of random init (e.g. the fc-only head, before training the trunk with it);
            keyed by its manifest key.

    Raises:
        SettingsChanged: ``out`` holds a run with other settings and ``force`` is false.
        BadSetting: a minibatch of fewer windows than processes (``batch-size``).
        ValueError: caches that cannot be mixed, no fg/bg windows, a head to start from of
            another shape, a trunk that cannot be trained from ``train_from``.
    """
    from spp_detect.stage_dir import read_manifest

    out = Path(out)
    device = canonical_device(device)
    if settings.batch_size < world_size:
        raise BadSetting("batch-size", f"{settings.batch_size} windows cannot be split over {world_size} processes")
    parallel = world_size > 1
    if parallel:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError(f"world_size {world_size} given, but no process group: call init_process_group first")
    barrier = (lambda: dist.barrier()) if parallel else (lambda: None)
    caches = open_caches(cache_folders)
    conv = settings.train_from != FC_ONLY
    trunk_weights = trunk_weights_for(caches, weights) if conv else None
    config = {**settings_config(settings), "caches": [c.key for c in caches],
              "init_head": read_manifest(Path(init_head))["key"] if init_head is not None else None}
    if rank == 0:  # the only process that may delete (force) before the others look
        open_stage(out, "finetune", config, force=force, shard=(1, world_size))
    barrier()
    if rank != 0:
        open_stage(out, "finetune", config, shard=(rank + 1, world_size))
    summary = FinetuneSummary(processes=world_size)
    if (out / "head.npz").is_file():
        summary.already_done = True
        return summary

    head = _initial_head(caches, settings, init_head, device)
    scale = float(head.input_scale)
    end = settings.iterations if stop_after is None else min(settings.iterations, stop_after)
    training = (_ConvTraining(caches, settings, head, trunk_weights, device, rank, world_size) if conv
                else _FcTraining(caches, settings, head, device, rank, world_size, end))
    optimizer = _optimizer(training.module, settings)
    iteration = 0
    if (out / CHECKPOINT).is_file():
        iteration = _load_checkpoint(out, training.module, optimizer)
        summary.resumed_from = iteration
    log_path = out / "train_log.json"
    rounds = json.loads(log_path.read_text()) if iteration and log_path.is_file() else []
    rounds = [r for r in rounds if r["iteration"] <= iteration]
    barrier()  # every rank has read the checkpoint before rank 0 may write the next one
    model: nn.Module = training.module
    if parallel:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(training.module, device_ids=[device.index] if device.type == "cuda" else None)
    windows = training.windows
    log.info(
        "finetune: %d images, %d fg / %d bg candidate windows, input scale %.4g, training from %s, rank %d of %d",
        len(windows.pairs), len(windows.fg_image), len(windows.bg_image), scale, settings.train_from, rank, world_size,
    )
    bar = track(progress if rank == 0 else None, range(iteration, end), "finetune", total=settings.iterations,
                initial=iteration)
    ticks = iter(bar)  # one tick per iteration started; the bar counts the ones done
    start_time = time.perf_counter()
    model.train()
    while iteration < end:
        round_index = iteration // settings.round_iterations
        count = round_count(settings, round_index)  # checkpoints fall on round boundaries
        round_start = time.perf_counter()
        training.start_round(round_index, count)
        rounds.append(_train_round(training, model, optimizer, settings, iteration, count, ticks, bar, device, parallel))
        iteration += count
        summary.round_seconds.append(time.perf_counter() - round_start)  # not in the log: a rerun writes equal bytes
        if rank == 0:
            _save_checkpoint(out, training.module, optimizer, iteration)
            atomic_write(log_path, lambda p: p.write_text(json.dumps(rounds, indent=1)))
        summary.iterations_run += count
    for _ in ticks:  # the bar's last count, and its end
        pass
    summary.seconds = time.perf_counter() - start_time
    summary.rounds = rounds
    summary.passes = training.passes
    if iteration >= settings.iterations and rank == 0:
        _save_trained(out, training, head, caches, settings, trunk_weights)
    barrier()  # the head (or checkpoint) is on disk when any process returns
    return summary


def _initial_head(caches: Sequence[FeatureCache], settings: FinetuneSettings, init_head: Path | str | None,
                  device: torch.device) -> SPPHead:
    """The head training starts from: ``init_head``'s (checked against the caches' shape),
    or fc6-fc8 at their initialisation with the input scale the training features need;
    fc8 has background + the classes the caches' data carries (open_caches checked they agree)."""
    torch.manual_seed(settings.seed)  # initial weights
    shape = (caches[0].feature_dim, settings.fc_dim, len(caches[0].classes) + 1)
    if init_head is not None:
        head = load_head(init_head)
        if (head.in_dim, head.fc_dim, head.num_classes) != shape:
            raise ValueError(f"the head in {init_head} is {head.in_dim} -> {head.fc_dim} -> {head.num_classes}; "
                             f"these caches and settings need {shape[0]} -> {shape[1]} -> {shape[2]}")
        return head.to(device)
    scale = TARGET_NORM / mean_feature_norm(caches, "pool", seed=settings.seed, device=device)
    return SPPHead(*shape, input_scale=scale).to(device)


def _train_round(training, model: nn.Module, optimizer: torch.optim.SGD, settings: FinetuneSettings, first: int,
                 count: int, ticks, bar, device: torch.device, parallel: bool) -> dict[str, float]:
    """SGD on minibatches ``first .. first + count - 1`` of a prepared round; its log entry
    (``iteration`` after it, mean ``loss``, ``fg_accuracy``), summed over the processes."""
    # [loss sum, windows, fg hits, fg windows] over the round
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for iteration in range(first, first + count):
        next(ticks, None)
        lr = _set_lr(optimizer, settings, iteration)
        logits, labels, multiplier = training.step(model, iteration)
        loss_sum = nn.functional.cross_entropy(logits, labels, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        (loss_sum * multiplier).backward()
        optimizer.step()
        fg = labels > 0
        hits = (logits.argmax(1)[fg] == labels[fg]).sum()
        totals += torch.stack([loss_sum.detach().double(), torch.tensor(float(len(labels)), device=device,
                               dtype=torch.float64), hits.double(), fg.sum().double()])
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(loss_sum.detach()) / max(len(labels), 1):.3f}", lr=f"{lr:g}")
    if parallel:
        import torch.distributed as dist

        dist.all_reduce(totals)
    loss_sum_round, windows_round, fg_hits, fg_total = (float(v) for v in totals.cpu())
    return {"iteration": first + count, "loss": loss_sum_round / max(windows_round, 1),
            "fg_accuracy": fg_hits / max(fg_total, 1)}


def _save_trained(out: Path, training, head: SPPHead, caches: Sequence[FeatureCache], settings: FinetuneSettings,
                  trunk_weights: str | None) -> None:
    """Write the finished head (and a trained trunk, keyed by its identity) and drop the checkpoint."""
    if settings.train_from != FC_ONLY:
        from spp_detect.conv_finetune import save_trunk

        record = save_trunk(out, training.model, caches[0].backbone, caches[0].manifest["config"]["input_norm"],
                            trunk_weights, settings.train_from)
        features_from = record.identity
    else:
        features_from = caches[0].weights
    save_head(out, head.eval(), features_from=features_from)
    (out / CHECKPOINT).unlink(missing_ok=True)
