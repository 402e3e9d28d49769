"""The train-svm stage: one linear SVM per class with hard-negative mining, optionally
with bounding-box regressors, on features read from extract caches.

The recipe is the release's (``spp_train.m``, docs/sources.md 1.7): positives are the ground-truth
boxes (difficult ones included by default, as ``with_hard_samples = false`` keeps all
objects), negatives are windows with IoU < 0.3 against every box of the class, windows
mapping to the same cells at the same scale are deduplicated, features are scaled to a
mean norm of 20, and the negatives are mined in one pass (:mod:`svm.hard_negatives`).
Every class is trained after the first image, then whenever it has gathered more than
2,000 new negatives, and after the last image.

Memory is bounded by the mining caches: positives and cached negatives are float16 rows of
one store shared by the classes (:class:`svm.feature_store.HalfStore`: a window hard for
several classes is kept once), which the solver (:mod:`svm.dcd`, default) reads in place,
keeping each class's dual variables for a warm start at its next retraining; box-regression
samples go to a float16 scratch file per class (:class:`svm.bbox_reg.BoxSampleStore`,
deleted at the end); nothing else is kept per image. ``C = "auto"`` (the default) is the release's
0.001 rescaled to the number of training images (:func:`svm.linear.auto_c`).

Outputs in the stage folder: ``svm.npz`` (``weights [D, C]``, ``bias [C]``,
``feature_scale``), ``svm.json`` (classes, layer, per-class counts, the head used) and,
with box regression, ``bbox.npz`` (:class:`svm.bbox_reg.BoxRegressor`).

The steps: :func:`_collect_positives` (pass 1), :class:`_Mining` (pass 2:
:meth:`_Mining.mine_image`, :meth:`_Mining.retrain`), :func:`_write_model`. A killed run
resumes: :meth:`_Mining.checkpoint` writes the mining state after pass 1 and then after an
image once :data:`CHECKPOINT_SECONDS` or :data:`CHECKPOINT_SHARE` of the images have passed
(``mining-state.npz`` plus an append-only row log of the rows added since, so a checkpoint
costs the new rows, not the cache), :meth:`_Mining.restore` takes it up, and the model is
byte for byte an uninterrupted run's; the checkpoint files go when the model is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spp_detect.boxes import box_iou
from spp_detect.cache import CachedImage, FeatureCache
from spp_detect.device import canonical_device
from spp_detect.head import FEATURE_LAYERS, PRECISIONS, SPPHead, at_precision, check_head_reads, load_head
from spp_detect.labels import class_overlaps
from spp_detect.stage_dir import (
    BadSetting,
    Progress,
    atomic_write,
    open_stage,
    read_manifest,
    settings_config,
    track,
    write_npz,
)
from spp_detect.tensor_io import load_tensors, save_tensors
from spp_detect.window_features import TARGET_NORM, distinct_windows, mean_feature_norm, open_caches, window_features
from svm.bbox_reg import SPP_LAMBDA, SPP_MIN_OVERLAP, BoxRegressor, BoxSampleStore
from svm.dcd import half_scores, solve_dcd
from svm.feature_store import HalfStore
from svm.hard_negatives import EVICT_THRESHOLD, HARD_THRESHOLD, NEGATIVE_IOU, RETRAIN_LIMIT, NegativeCache
from svm.linear import BIAS_MULT, POS_WEIGHT, SOLVERS, SVM_C, SVM_TOL, auto_c, objective_from_scores, train_linear_svm

__all__ = ["SVMSettings", "SVMModel", "SVMSummary", "run_train_svm", "load_svm"]

log = logging.getLogger(__name__)
#: Window keys for the negative caches: ``image_number << WINDOW_BITS | window index``.
WINDOW_BITS = 24
#: Bias of a class without positives in the training set: it never scores above any threshold.
UNTRAINED_BIAS = -1.0e4


@dataclass(frozen=True)
class SVMSettings:
    """Everything an SVM training run depends on (its manifest key hashes it).
    Defaults are the release's; each constant's source is where it is defined."""

    layer: str = field(default="fc7", metadata={"help": (
        "Window features the SVMs read: the pooled SPP vector or a head layer (paper Table 6 rows).")})
    #: ``"auto"``: ``0.001 x 5011 / training images`` (:func:`svm.linear.auto_c`); or a float.
    C: float | str = field(default="auto", metadata={"help": (
        "SVM cost: a positive number, or 'auto' = 0.001 x 5011 / training images, the release's 0.001 on "
        "VOC07's 5,011 trainval images.")})
    pos_weight: float = POS_WEIGHT
    bias_mult: float = BIAS_MULT
    tol: float = field(default=SVM_TOL, metadata={"help": (
        "Solver stopping tolerance (liblinear's projected-gradient rule). 0.01 by default; 0.1 is the release's "
        "(liblinear's default), which stops far from the optimum.")})
    solver: str = field(default="dcd", metadata={"help": (
        "dcd: liblinear's dual coordinate descent compiled here, reading the float16 caches in place, warm-started "
        "at every retraining; liblinear: scikit-learn's LinearSVC (the same problem, for comparison).")})
    negative_iou: float = NEGATIVE_IOU
    hard_threshold: float = HARD_THRESHOLD
    evict_threshold: float = EVICT_THRESHOLD
    retrain_limit: int = RETRAIN_LIMIT
    include_difficult: bool = field(default=True, metadata={"help": (
        "Difficult ground truths among the positives (the release keeps them).")})
    #: arithmetic of the head's fc6/fc7 while mining (:data:`spp_detect.head.PRECISIONS`)
    precision: str = field(default="fp32", metadata={"help": (
        "fc6/fc7 arithmetic while mining, as detect --precision: bf16 is 2-5x faster where the CPU or GPU has "
        "bf16 instructions, approximate. The SVMs are float32 either way.")})
    bbox: bool = field(default=False, metadata={"help": "Also fit per-class box regressors on the pooled features."})
    bbox_lambda: float = field(default=SPP_LAMBDA, metadata={"help": "Ridge penalty (SPP-net: 4000; R-CNN: 1000)."})
    bbox_min_overlap: float = field(default=SPP_MIN_OVERLAP, metadata={"help": (
        "Regress windows with IoU > this (SPP-net: 0.5; R-CNN: 0.6).")})
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layer not in FEATURE_LAYERS:
            raise ValueError(f"unknown feature layer {self.layer!r}; choose from {FEATURE_LAYERS}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown SVM solver {self.solver!r}; choose from {SOLVERS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision != "fp32" and self.layer == "pool":
            raise ValueError("--precision bf16 applies to the fc layers of a fine-tuned head; --features pool has none")
        c = self.C
        if isinstance(c, str) and c != "auto":
            try:  # "0.05" from a command line is the number 0.05 (one key for both spellings)
                c = float(c)
            except ValueError:
                raise ValueError(f"SVM C must be 'auto' or a positive number, got {self.C!r}") from None
        if c != "auto" and not (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0):
            raise ValueError(f"SVM C must be 'auto' or a positive number, got {self.C!r}")
        object.__setattr__(self, "C", c if c == "auto" else float(c))

    def resolved_c(self, num_images: int) -> float:
        """The SVM cost for ``num_images`` training images: :func:`svm.linear.auto_c` for
        ``"auto"`` (the release's 0.001 at VOC2007's 5,011), else ``C`` itself."""
        return auto_c(num_images, SVM_C) if self.C == "auto" else float(self.C)


@dataclass
class SVMModel:
    """Linear scorers for every class: ``score = (feature_scale * f) @ weights + bias``.

    Attributes:
        weights: ``Tensor[D, C]`` float32; ``bias``: ``Tensor[C]``.
        feature_scale: brings ``layer`` features to mean norm 20.
        layer: ``pool``, ``fc6`` or ``fc7``; ``classes``: class names, in column order.
        head: the fine-tuned head (for ``fc6``/``fc7``) or None.
        regressor: box regressors on pooled features, or None.
    """

    weights: Tensor
    bias: Tensor
    feature_scale: float
    layer: str
    classes: tuple[str, ...]
    head: SPPHead | None = None
    regressor: BoxRegressor | None = None

    @property
    def pooled_dim(self) -> int:
        """Length of the pooled features the model reads (its head's input, or its SVMs')."""
        return self.head.in_dim if self.head is not None else int(self.weights.shape[0])

    def scores(self, features: Tensor, overwrite_input: bool = False) -> Tensor:
        """``Tensor[N, C]`` scores of ``Tensor[N, D]`` unscaled ``layer`` features;
        ``overwrite_input``: ``features`` may be scaled in place (same values, no copy)."""
        scaled = features.mul_(self.feature_scale) if overwrite_input else features * self.feature_scale
        return scaled @ self.weights.to(features) + self.bias.to(features)


@dataclass
class SVMSummary:
    images: int = 0
    seconds: float = 0.0
    C: float = 0.0
    positives: dict[str, int] = field(default_factory=dict)
    negatives: dict[str, int] = field(default_factory=dict)
    retrains: dict[str, int] = field(default_factory=dict)
    bbox_samples: int = 0
    untrained: list[str] = field(default_factory=list)
    objective: dict[str, float] = field(default_factory=dict)
    #: cached negatives over all classes, each window counted once (the store's rows)
    distinct_negatives: int = 0
    already_done: bool = False
    #: images mined before this run, by the killed run it resumed (None: not resumed; 0: it
    #: resumed after the positives' pass); ``images_mined``: images this run mined
    resumed_from: int | None = None
    images_mined: int = 0

    def describe(self, out: Path | str) -> str:
        """One line for the command line about the run into ``out``."""
        if self.already_done:
            return f"train-svm: {out} already holds trained SVMs (use --force to retrain)"
        return (f"train-svm: {len(self.positives)} classes on {self.images} images (C = {self.C:.4g}) in {self.seconds:.0f} s; "
                f"{sum(self.positives.values())} positives, {sum(self.negatives.values())} cached hard negatives "
                f"({self.distinct_negatives} distinct windows)"
                + (f", box regression on {self.bbox_samples} windows" if self.bbox_samples else "")
                + (f", resumed after {self.resumed_from} images" if self.resumed_from is not None else "") + f" -> {out}"
                + (f"\n  {len(self.untrained)} class(es) with no training examples (no ground truth in the training "
                   f"caches): {', '.join(self.untrained)}; never detected, and marked so in evaluate's table"
                   if self.untrained else ""))


def run_train_svm(
    cache_folders: Sequence[Path | str],
    out: Path | str,
    settings: SVMSettings,
    *,
    head_folder: Path | str | None = None,
    device: torch.device | str = "cpu",
    force: bool = False,
    progress: Progress | None = None,
    final_problem: Callable[[int, Tensor, Tensor, Tensor, float], None] | None = None,
) -> SVMSummary:
    """Train the SVMs (and box regressors) of ``settings`` on the images of ``cache_folders``.

    A run killed before it finished resumes from its last checkpoint (:class:`_Mining`):
    the images mined before it are not mined again, and the model is byte for byte the one
    an uninterrupted run writes.

    Args:
        cache_folders: one or more extract caches (training images).
        out: the stage folder.
        head_folder: a ``finetune`` folder; required for ``fc6``/``fc7`` features.
        device: where features are pooled and the head runs.
        force: start over even if ``out`` holds another model.
        progress: the progress protocol (:class:`spp_detect.stage_dir.Progress`), over each pass.
        final_problem: called once per trained class after its last retraining as
            ``final_problem(class, positives Tensor[P, D], negatives Tensor[Q, D], w Tensor[D], b)``
            (float16 scaled features: the exact problem its SVM solved), e.g. to compare solvers.

    Raises:
        SettingsChanged: ``out`` holds another model and ``force`` is false.
        BadSetting: fc6/fc7 without a head (``head``).
        ValueError: caches that cannot be mixed, a class without positives.
    """
    out = Path(out)
    device = canonical_device(device)
    if settings.layer != "pool" and head_folder is None:
        raise BadSetting("head", f"--features {settings.layer} reads a fine-tuned head: add --head FOLDER (from finetune), "
                                 "or use --features pool")
    caches = open_caches(cache_folders)
    head = None
    if settings.layer != "pool":
        head = load_head(head_folder).to(device)
        for cache in caches:
            check_head_reads(head, cache.folder, cache.weights)
        if head.in_dim != caches[0].feature_dim:
            raise ValueError(f"the head in {head_folder} takes {head.in_dim}-d features, the caches give {caches[0].feature_dim}")
        head = at_precision(head, settings.precision)
    head_key = read_manifest(head_folder)["key"] if head is not None else None
    num_images = sum(len(c.image_ids) for c in caches)
    svm_c = settings.resolved_c(num_images)
    config = {**settings_config(settings), "caches": [c.key for c in caches], "head": head_key, "resolved_C": svm_c}
    manifest = open_stage(out, "train-svm", config, force=force).manifest
    summary = SVMSummary(C=svm_c)
    if (out / "svm.npz").is_file():
        _remove_checkpoint(out)  # a run killed after writing its model, before removing its checkpoint
        summary.already_done = True
        return summary
    start = time.perf_counter()
    classes = caches[0].classes  # the data's class list (open_caches checked the caches agree)
    pairs = [(i, im) for i, c in enumerate(caches) for im in c.image_ids]
    summary.images = len(pairs)
    context = _MiningContext(out, settings, svm_c, len(classes), len(pairs), manifest["key"], caches[0].feature_dim)

    mining = _Mining.restore(context)
    if mining is not None:
        summary.resumed_from = mining.images_done
        log.info("train-svm: resuming after %d of %d images mined (checkpoint in %s)", mining.images_done, len(pairs), out)
    else:
        _remove_checkpoint(out)
        scale = TARGET_NORM / mean_feature_norm(caches, settings.layer, head, seed=settings.seed, device=device)
        pool_scale = scale if settings.layer == "pool" else TARGET_NORM / mean_feature_norm(caches, "pool", seed=settings.seed, device=device)
        positives, bbox_store = _collect_positives(caches, pairs, settings, head, scale, context, device, progress)
        mining = _Mining.start(context, positives, bbox_store, scale, pool_scale)
        mining.checkpoint()  # pass 1 is not redone
    summary.untrained = [classes[c] for c in range(len(classes)) if not mining.pos_counts[c]]
    if summary.untrained:
        log.warning("no positives for %s: those classes get no detector", ", ".join(summary.untrained))

    mining.mine(caches, pairs, head, device, progress, final_problem)
    summary.images_mined = mining.images_mined
    for c in mining.active:
        if not mining.trained[c]:
            raise ValueError(f"no negative windows for class {classes[c]}")
    _write_model(out, mining, summary, classes, settings, head_folder if head is not None else None, head_key)
    _remove_checkpoint(out)
    summary.seconds = time.perf_counter() - start
    return summary


#: train-svm's checkpoint files in its stage folder (removed when the model is written): the
#: mining state, the row log it is consistent with (``<generation>`` grows at each compaction),
#: and the box-regression samples' scratch folder.
MINING_STATE = "mining-state.npz"
ROW_LOG = "mining-rows-{generation}.bin"
BBOX_SCRATCH = "bbox-samples.tmp"
#: A checkpoint is written after an image once this many seconds have passed since the last one ...
CHECKPOINT_SECONDS: float = 60.0
#: ... or once this share of the images has been mined since the last one, whichever comes first.
CHECKPOINT_SHARE: float = 0.05
#: The row log is rewritten (compacted) when it holds more than this many times the live rows.
LOG_SLACK: float = 2.0
#: Rows written or read at once in the row log.
LOG_BLOCK = 4096
_STATE_VERSION = 1
#: Test hook: called with the number of images mined after each image (and its checkpoint).
_after_image: Callable[[int], None] | None = None


def _remove_checkpoint(out: Path) -> None:
    """Delete the checkpoint files of a train-svm folder (state, row logs, box samples)."""
    (out / MINING_STATE).unlink(missing_ok=True)
    for path in out.glob(ROW_LOG.format(generation="*")):
        path.unlink(missing_ok=True)
    shutil.rmtree(out / BBOX_SCRATCH, ignore_errors=True)


@dataclass(frozen=True)
class _MiningContext:
    """What a mining run and its checkpoint are for: the folder, settings, and sizes."""

    out: Path
    settings: SVMSettings
    svm_c: float
    num_classes: int
    num_images: int
    key: str  # the stage folder's manifest key: a checkpoint of other settings is never read
    pooled_dim: int  # the pooled features' length (box-regression samples)


def _collect_positives(
    caches: Sequence[FeatureCache],
    pairs: list[tuple[int, str]],
    settings: SVMSettings,
    head: SPPHead | None,
    scale: float,
    context: _MiningContext,
    device: torch.device,
    progress: Progress | None,
) -> tuple[list[list[Tensor]], BoxSampleStore | None]:
    """Pass 1: each class's positives (its ground-truth boxes' ``layer`` features, scaled,
    float16) and, with box regression, the samples (windows with IoU > ``bbox_min_overlap``,
    pooled features spilled to disk, synced so that a checkpoint may record them)."""
    positives: list[list[Tensor]] = [[] for _ in range(context.num_classes)]
    bbox_store = BoxSampleStore(context.out / BBOX_SCRATCH, context.pooled_dim, context.num_classes) if settings.bbox else None
    for image in _lazy(caches, pairs, "positives", progress):
        gt = torch.arange(len(image.gt_labels))
        if not settings.include_difficult:
            gt = gt[~image.gt_difficult]
        if len(gt):
            feats = (window_features(image, settings.layer, head, gt, device=device).cpu() * scale).to(torch.float16)
            for c in image.gt_labels[gt].unique().tolist():
                positives[c].append(feats[image.gt_labels[gt] == c])
        if bbox_store is not None and len(image.gt_labels):
            iou = box_iou(image.boxes, image.gt_boxes)  # [N, G]
            best, which = iou.max(dim=1)
            rows = torch.nonzero(best > settings.bbox_min_overlap).flatten()  # strictly >, docs/sources.md 1.9
            if len(rows):
                pooled = window_features(image, "pool", None, rows, device=device).cpu()
                bbox_store.add(pooled, image.boxes[rows], image.gt_boxes[which[rows]], image.gt_labels[which[rows]])
    if not any(positives):
        raise ValueError("the training caches hold no ground-truth windows: nothing to train")
    if bbox_store is not None:
        bbox_store.sync()
    return positives, bbox_store


class _Mining:
    """Pass 2, hard-negative mining (one epoch), and its checkpoint.

    State: each class's SVM (``weights [D, C]``, ``bias [C]``, ``trained``, ``retrains``), its
    :class:`svm.hard_negatives.NegativeCache`, the positives' dual variables
    (``pos_alphas``), the shared :class:`svm.feature_store.HalfStore` of positives and cached
    negatives, the images mined so far, and what pass 1 gave (positive counts, the feature
    scales, the box-regression samples).

    Checkpoint (:meth:`checkpoint`, after an image once :data:`CHECKPOINT_SECONDS` or
    :data:`CHECKPOINT_SHARE` of the images have passed since the last one): the store's rows
    that are live (a positive or in some class's cache) and new since the last checkpoint are
    appended to the row log (``mining-rows-<g>.bin``: records of an ``int64`` key and ``D``
    float16 values, keys increasing), flushed, then everything else goes to the small
    ``mining-state.npz`` (atomic), with the log length it is consistent with. A log holding
    more than :data:`LOG_SLACK` times the live rows is rewritten as generation ``g + 1``
    (atomically; the state names the generation, the old file goes after the state). So a
    checkpoint writes the rows added since the last one, never the whole store.

    :meth:`restore` reads the state, cuts the log back to its recorded length (bytes of a
    checkpoint killed midway are ignored), rebuilds the store from the log's live rows, and
    mining goes on at the next image. The solver reads rows by key (positives, then the
    class's negatives in cache order), so the rebuilt store, whose rows sit elsewhere, gives
    the same problems, the same dual variables and the same bytes.
    """

    def __init__(self, context: _MiningContext, dim: int, pos_counts: list[int], scale: float, pool_scale: float,
                 bbox_store: BoxSampleStore | None) -> None:
        c_all = context.num_classes
        self.context = context
        self.settings = context.settings
        self.dim = dim
        self.pos_counts = pos_counts
        self.active = [c for c in range(c_all) if pos_counts[c]]
        self.scale, self.pool_scale = scale, pool_scale
        self.bbox_store = bbox_store
        self.negatives = [NegativeCache(self.settings.retrain_limit) for _ in range(c_all)]
        total = sum(pos_counts)
        self.pos_keys = np.split(np.arange(total, dtype=np.int64) - total, np.cumsum(pos_counts)[:-1])
        self.store = HalfStore(dim, live=self.live_keys)
        self.pos_alphas = [np.zeros(n) for n in pos_counts]  # dual variables (dcd warm start)
        self.weights = torch.zeros((dim, c_all))
        self.bias = torch.full((c_all,), UNTRAINED_BIAS)
        self.retrains = [0] * c_all
        self.trained = [False] * c_all
        self.objective: dict[int, float] = {}
        self.images_done = 0  # images mined, this run and the runs it resumed
        self.images_mined = 0  # images mined by this run
        # the row log: its generation, its length in records, the last store key it has seen
        self.log_generation = 0
        self.log_records = 0
        self.logged_key = np.iinfo(np.int64).min
        self._since = (time.perf_counter(), 0)  # (time, images_done) of the last checkpoint

    # ------------------------------------------------------------------ set-up
    @classmethod
    def start(cls, context: _MiningContext, positives: list[list[Tensor]], bbox_store: BoxSampleStore | None,
              scale: float, pool_scale: float) -> "_Mining":
        """The state after pass 1: the positives in the store (keys ``-P .. -1``), nothing mined."""
        pos_counts = [sum(len(p) for p in positives[c]) for c in range(context.num_classes)]
        dim = next(p[0].shape[1] for p in positives if p)
        mining = cls(context, dim, pos_counts, scale, pool_scale, bbox_store)
        for c in mining.active:
            mining.store.add(mining.pos_keys[c], torch.cat(positives[c]))
        return mining

    def live_keys(self) -> np.ndarray:
        """Keys of every row still needed: the positives' and each class's cached negatives'."""
        return np.concatenate(self.pos_keys + [n.keys.numpy() for n in self.negatives])

    # ------------------------------------------------------------------ pass 2
    def mine(self, caches: Sequence[FeatureCache], pairs: list[tuple[int, str]], head: SPPHead | None,
             device: torch.device, progress: Progress | None, final_problem: Callable | None) -> None:
        """Mine the images from :attr:`images_done` on, checkpointing as it goes."""
        every = max(1, math.ceil(CHECKPOINT_SHARE * len(pairs)))
        self._since = (time.perf_counter(), self.images_done)
        # the solver releases the GIL: the classes due at an image are retrained on all cores at once
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as solvers:
            todo = pairs[self.images_done:]
            for number, image in enumerate(_lazy(caches, todo, "mining", progress, self.images_done), start=self.images_done):
                last = number == len(pairs) - 1
                self.mine_image(number, image, last, head, device, solvers, final_problem)
                self.images_done, self.images_mined = number + 1, self.images_mined + 1
                since_time, since_images = self._since
                if not last and (self.images_done - since_images >= every
                                 or time.perf_counter() - since_time >= CHECKPOINT_SECONDS):
                    self.checkpoint()
                if _after_image is not None:
                    _after_image(self.images_done)

    def mine_image(self, number: int, image: CachedImage, last: bool, head: SPPHead | None, device: torch.device,
                   solvers: ThreadPoolExecutor, final_problem: Callable | None = None) -> None:
        """Offer image ``number``'s negative windows to every class's cache, store the rows
        added, and retrain the classes that are due (all at the last image)."""
        settings = self.settings
        # only one window per distinct (scale, cells) is a candidate: the release's dedup
        first = distinct_windows(image)[0].sort().values  # [U] window indices, ascending
        feats = window_features(image, settings.layer, head, first, device=device).cpu() * self.scale  # [U, D]
        overlaps = class_overlaps(image.boxes[first], image.gt_boxes, image.gt_labels, self.context.num_classes)  # [U, C]
        keys = (number << WINDOW_BITS) + first  # the window's own index: keys are unique and increasing
        scores = feats @ self.weights + self.bias  # [U, C]
        added = torch.zeros(len(first), dtype=torch.bool)
        for c in self.active:
            cand = torch.nonzero(overlaps[:, c] < settings.negative_iou).flatten()
            offered = self.negatives[c].offer(keys[cand], scores[cand, c] if self.trained[c] else None, settings.hard_threshold)
            added[cand[offered]] = True
        self.store.add(keys[added], feats[added])  # a window hard for several classes is stored once
        due = [c for c in self.active
               if (not self.trained[c] or self.negatives[c].needs_retraining() or last) and len(self.negatives[c])]
        list(solvers.map(lambda c: self.retrain(c, last, final_problem), due))  # classes are independent: solved in parallel

    def retrain(self, c: int, last: bool, final_problem: Callable | None = None) -> None:
        """Solve class ``c`` on its positives and cached negatives (warm-started), then evict
        its easy negatives; ``last``: the final problem (its objective is recorded)."""
        settings, svm_c, store, negatives = self.settings, self.context.svm_c, self.store, self.negatives[c]
        rows = store.rows(np.concatenate([self.pos_keys[c], negatives.keys.numpy()]))
        npos = self.pos_counts[c]
        labels = np.concatenate([np.ones(npos), -np.ones(len(rows) - npos)])
        if settings.solver == "dcd":
            warm = np.concatenate([self.pos_alphas[c], negatives.alphas.numpy()])
            w64, b, alpha, _ = solve_dcd(store.data, labels, svm_c * settings.pos_weight, svm_c, settings.bias_mult,
                                         settings.tol, alpha=warm, rows=rows, seed=settings.seed)
            self.pos_alphas[c], negatives.alphas = alpha[:npos], torch.from_numpy(alpha[npos:])
        else:
            examples = torch.from_numpy(store.data[rows])
            w, b = train_linear_svm(examples[:npos], examples[npos:], svm_c, settings.pos_weight, settings.bias_mult,
                                    tol=settings.tol, solver="liblinear")
            w64 = w.double().numpy()
        self.weights[:, c], self.bias[c] = torch.from_numpy(w64).float(), b
        self.trained[c] = True
        self.retrains[c] += 1
        scores = half_scores(store.data, w64, b, rows)  # [P + Q] float64
        if last:  # the final problem, before eviction (the release evicts after every retraining)
            self.objective[c] = objective_from_scores(scores, labels, w64, b, svm_c, settings.pos_weight, settings.bias_mult)
            if final_problem is not None:
                examples = torch.from_numpy(store.data[rows])
                final_problem(c, examples[:npos], examples[npos:], self.weights[:, c].clone(), float(b))
        negatives.retrained(torch.from_numpy(scores[npos:]), settings.evict_threshold)

    # ------------------------------------------------------------------ checkpoint
    def _record(self) -> np.dtype:
        return np.dtype([("key", "<i8"), ("row", "<f2", (self.dim,))])

    def _log_path(self, generation: int) -> Path:
        return self.context.out / ROW_LOG.format(generation=generation)

    def _write_records(self, fh, rows: np.ndarray) -> None:
        """Write store rows ``rows`` (indices, ascending) as log records to ``fh``, in blocks."""
        record = self._record()
        for s in range(0, len(rows), LOG_BLOCK):
            part = rows[s:s + LOG_BLOCK]
            block = np.empty(len(part), dtype=record)
            block["key"] = self.store.keys[part]
            block["row"] = self.store.data[part]
            fh.write(block.tobytes())

    def checkpoint(self) -> None:
        """Append the new live rows to the row log (or rewrite it when it holds more than
        :data:`LOG_SLACK` times the live rows), then write the state that names it."""
        live = np.unique(self.live_keys())
        keys = self.store.keys
        is_live = np.isin(keys, live)
        new = np.flatnonzero(is_live & (keys > self.logged_key))
        old_path = None
        if self.log_records + len(new) > LOG_SLACK * len(live) and self.log_records:
            old_path = self._log_path(self.log_generation)
            self.log_generation += 1
            rows = np.flatnonzero(is_live)
            atomic_write(self._log_path(self.log_generation), lambda p: self._write_file(p, rows))
            self.log_records = len(rows)
        elif len(new):
            path = self._log_path(self.log_generation)
            with open(path, "r+b" if path.exists() else "wb") as fh:
                fh.seek(self.log_records * self._record().itemsize)
                self._write_records(fh, new)
                fh.truncate()
                fh.flush()
                os.fsync(fh.fileno())
            self.log_records += len(new)
        if len(keys):
            self.logged_key = max(self.logged_key, int(keys[-1]))
        write_npz(self.context.out / MINING_STATE, self._state())
        if old_path is not None:
            old_path.unlink(missing_ok=True)
        self._since = (time.perf_counter(), self.images_done)
        log.debug("train-svm: checkpoint after %d images (%d rows in log %d)", self.images_done, self.log_records,
                  self.log_generation)

    def _write_file(self, path: Path, rows: np.ndarray) -> None:
        with open(path, "wb") as fh:
            self._write_records(fh, rows)

    def _state(self) -> dict[str, np.ndarray]:
        c_all = self.context.num_classes
        state = {
            "version": np.int64(_STATE_VERSION),
            "key": np.array(self.context.key),
            "num_images": np.int64(self.context.num_images),
            "num_classes": np.int64(c_all),
            "dim": np.int64(self.dim),
            "images_done": np.int64(self.images_done),
            "log_generation": np.int64(self.log_generation),
            "log_records": np.int64(self.log_records),
            "logged_key": np.int64(self.logged_key),
            "scale": np.float64(self.scale),
            "pool_scale": np.float64(self.pool_scale),
            "pos_counts": np.asarray(self.pos_counts, dtype=np.int64),
            "pos_alphas": np.concatenate([np.asarray(a, dtype=np.float64) for a in self.pos_alphas]),
            "weights": self.weights.numpy(),
            "bias": self.bias.numpy(),
            "trained": np.asarray(self.trained, dtype=bool),
            "retrains": np.asarray(self.retrains, dtype=np.int64),
            "neg_counts": np.asarray([len(n) for n in self.negatives], dtype=np.int64),
            "neg_keys": np.concatenate([n.keys.numpy() for n in self.negatives]),
            "neg_alphas": np.concatenate([n.alphas.numpy() for n in self.negatives]),
            "num_added": np.asarray([n.num_added for n in self.negatives], dtype=np.int64),
            "bbox": np.bool_(self.bbox_store is not None),
        }
        if self.bbox_store is not None:
            state.update({f"bbox_{k}": v for k, v in self.bbox_store.state().items()})
        return state

    @classmethod
    def restore(cls, context: _MiningContext) -> "_Mining | None":
        """The mining state of the folder's last checkpoint, or None if there is none (or it
        cannot be used: then the run starts over, with a warning)."""
        path = context.out / MINING_STATE
        if not path.is_file():
            return None
        try:
            return cls._restore(context, path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("train-svm: cannot resume from %s (%s): mining starts over", path, exc)
            return None

    @classmethod
    def _restore(cls, context: _MiningContext, path: Path) -> "_Mining":
        with np.load(path, allow_pickle=False) as archive:
            state = {name: archive[name] for name in archive.files}
        if int(state["version"]) != _STATE_VERSION or str(state["key"]) != context.key:
            raise ValueError("a checkpoint of another version or other settings")
        if int(state["num_images"]) != context.num_images or int(state["num_classes"]) != context.num_classes:
            raise ValueError("a checkpoint of other images")
        c_all = context.num_classes
        pos_counts = [int(n) for n in state["pos_counts"]]
        bbox_store = None
        if context.settings.bbox:
            if not bool(state["bbox"]):
                raise ValueError("a checkpoint without box-regression samples")
            bbox_store = BoxSampleStore.reopen(context.out / BBOX_SCRATCH, context.pooled_dim, c_all,
                                               {k: state[f"bbox_{k}"] for k in ("counts", "windows", "targets")})
        mining = cls(context, int(state["dim"]), pos_counts, float(state["scale"]), float(state["pool_scale"]), bbox_store)
        mining.images_done = int(state["images_done"])
        mining.pos_alphas = [a.copy() for a in np.split(state["pos_alphas"], np.cumsum(pos_counts)[:-1])]
        mining.weights = torch.from_numpy(state["weights"].copy())
        mining.bias = torch.from_numpy(state["bias"].copy())
        mining.trained = [bool(t) for t in state["trained"]]
        mining.retrains = [int(r) for r in state["retrains"]]
        ends = np.cumsum([0, *state["neg_counts"].tolist()])
        for c, negatives in enumerate(mining.negatives):
            negatives.keys = torch.from_numpy(state["neg_keys"][ends[c]:ends[c + 1]].copy())
            negatives.alphas = torch.from_numpy(state["neg_alphas"][ends[c]:ends[c + 1]].copy())
            negatives.num_added = int(state["num_added"][c])
        mining.log_generation = int(state["log_generation"])
        mining.log_records = int(state["log_records"])
        mining.logged_key = int(state["logged_key"])
        mining._rebuild_store()
        for other in context.out.glob(ROW_LOG.format(generation="*")):  # a compaction's leftovers
            if other != mining._log_path(mining.log_generation):
                other.unlink(missing_ok=True)
        return mining

    def _rebuild_store(self) -> None:
        """Fill the store with the live rows of the row log's first :attr:`log_records`
        records (bytes past them, of a checkpoint killed midway, are cut off)."""
        path, record = self._log_path(self.log_generation), self._record()
        size = self.log_records * record.itemsize
        found = path.stat().st_size if path.is_file() else 0
        if found < size:
            raise ValueError(f"{path.name} is shorter than the checkpoint says")
        if found > size:
            os.truncate(path, size)
        live = np.unique(self.live_keys())
        for s in range(0, self.log_records, LOG_BLOCK):
            block = np.fromfile(path, dtype=record, count=min(LOG_BLOCK, self.log_records - s), offset=s * record.itemsize)
            keep = np.isin(block["key"], live)
            self.store.add(block["key"][keep], torch.from_numpy(block["row"][keep]))
        if not np.array_equal(self.store.keys, live):
            raise ValueError(f"{path.name} lacks rows the checkpoint needs")


def _write_model(out: Path, mining: _Mining, summary: SVMSummary, classes: Sequence[str], settings: SVMSettings,
                 head_folder: Path | str | None, head_key: str | None) -> None:
    """Fill ``summary`` from the finished mining and write the model: ``bbox.npz`` (box
    regression), ``svm.json``, and last ``svm.npz`` (its presence marks the folder done)."""
    num_classes = len(classes)
    summary.positives = {classes[c]: mining.pos_counts[c] for c in range(num_classes)}
    summary.negatives = {classes[c]: len(mining.negatives[c]) for c in range(num_classes)}
    summary.retrains = {classes[c]: mining.retrains[c] for c in range(num_classes)}
    summary.objective = {classes[c]: value for c, value in sorted(mining.objective.items())}
    mining.store.compact()
    summary.distinct_negatives = len(mining.store) - sum(mining.pos_counts)
    bbox_store = mining.bbox_store
    if bbox_store is not None:
        regressor = bbox_store.fit(mining.pool_scale, settings.bbox_lambda)
        save_tensors(out / "bbox.npz", regressor.to_tensors())
        summary.bbox_samples = len(bbox_store)
    meta = {
        "classes": list(classes),
        "layer": settings.layer,
        "head": str(Path(head_folder).resolve()) if head_folder is not None else None,
        "head_key": head_key,
        "feature_scale": mining.scale,
        "C": mining.context.svm_c,
        "C_setting": settings.C,
        "solver": settings.solver,
        "objective": summary.objective,
        "positives": summary.positives,
        "negatives": summary.negatives,
        "distinct_negatives": summary.distinct_negatives,
        "retrains": summary.retrains,
        "bbox_samples": summary.bbox_samples,
        "untrained_classes": summary.untrained,
    }
    atomic_write(out / "svm.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    save_tensors(out / "svm.npz", {"weights": mining.weights, "bias": mining.bias, "feature_scale": torch.tensor(mining.scale)})
    if bbox_store is not None:
        bbox_store.close()


def _lazy(
    caches: Sequence[FeatureCache], pairs: list[tuple[int, str]], desc: str, progress: Progress | None, initial: int = 0
) -> Iterator[CachedImage]:
    """Images loaded one at a time, behind the progress wrapper (``initial``: images of the
    loop done before ``pairs``, by the run this one resumed)."""
    seq = track(progress, pairs, desc, initial=initial)
    for index, image_id in seq:
        yield caches[index].load(image_id)


def load_svm(folder: Path | str, device: torch.device | str = "cpu") -> SVMModel:
    """Read a ``train-svm`` folder, with its head (checked against the recorded key) and box
    regressors if present.

    Raises:
        FileNotFoundError: not a finished train-svm folder, or its head folder is gone.
        ValueError: the head folder now holds another head than the SVMs were trained on.
    """
    folder = Path(folder)
    meta_path = folder / "svm.json"
    if not (folder / "svm.npz").is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"{folder} holds no trained SVMs (svm.npz missing); run train-svm first")
    meta = json.loads(meta_path.read_text())
    tensors = load_tensors(folder / "svm.npz")
    head = None
    if meta["layer"] != "pool":
        head_folder = Path(meta["head"])
        if not head_folder.is_dir():
            raise FileNotFoundError(f"the SVMs in {folder} score {meta['layer']} features of the head in {head_folder}, which is gone")
        if read_manifest(head_folder)["key"] != meta["head_key"]:
            raise ValueError(f"{head_folder} now holds another head than the SVMs in {folder} were trained on; retrain them")
        head = load_head(head_folder).to(device)
    if tensors["weights"].ndim != 2 or tensors["weights"].shape[1] != len(meta["classes"]) or len(tensors["bias"]) != len(meta["classes"]):
        raise ValueError(f"{folder}/svm.npz does not match the {len(meta['classes'])} classes of its svm.json: damaged or mixed up")
    regressor = BoxRegressor.from_tensors(load_tensors(folder / "bbox.npz")) if (folder / "bbox.npz").is_file() else None
    return SVMModel(
        weights=tensors["weights"].to(device),
        bias=tensors["bias"].to(device),
        feature_scale=float(tensors["feature_scale"]),
        layer=meta["layer"],
        classes=tuple(meta["classes"]),
        head=head,
        regressor=regressor,
    )
