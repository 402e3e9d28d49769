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
"""

from __future__ import annotations

import json
import logging
import time
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
from spp_detect.head import FEATURE_LAYERS, SPPHead, check_head_reads, load_head
from spp_detect.labels import class_overlaps
from spp_detect.stage_dir import Progress, atomic_write, open_stage_dir, read_manifest, settings_config, track
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

    def describe(self, out: Path | str) -> str:
        """One line for the command line about the run into ``out``."""
        if self.already_done:
            return f"train-svm: {out} already holds trained SVMs (use --force to retrain)"
        return (f"train-svm: {len(self.positives)} classes on {self.images} images (C = {self.C:.4g}) in {self.seconds:.0f} s; "
                f"{sum(self.positives.values())} positives, {sum(self.negatives.values())} cached hard negatives "
                f"({self.distinct_negatives} distinct windows)"
                + (f", box regression on {self.bbox_samples} windows" if self.bbox_samples else "") + f" -> {out}")


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
        ValueError: fc6/fc7 without a head, caches that cannot be mixed, a class without
            positives.
    """
    out = Path(out)
    device = canonical_device(device)
    caches = open_caches(cache_folders)
    head = None
    if settings.layer != "pool":
        if head_folder is None:
            raise ValueError(f"--features {settings.layer} needs a fine-tuned head (--head FOLDER from finetune)")
        head = load_head(head_folder).to(device)
        for cache in caches:
            check_head_reads(head, cache.folder, cache.weights)
        if head.in_dim != caches[0].feature_dim:
            raise ValueError(f"the head in {head_folder} takes {head.in_dim}-d features, the caches give {caches[0].feature_dim}")
    head_key = read_manifest(head_folder)["key"] if head is not None else None
    num_images = sum(len(c.image_ids) for c in caches)
    svm_c = settings.resolved_c(num_images)
    config = {**settings_config(settings), "caches": [c.key for c in caches], "head": head_key, "resolved_C": svm_c}
    open_stage_dir(out, "train-svm", config, force=force)
    summary = SVMSummary(C=svm_c)
    if (out / "svm.npz").is_file():
        summary.already_done = True
        return summary
    start = time.perf_counter()
    classes = caches[0].classes  # the data's class list (open_caches checked the caches agree)
    num_classes = len(classes)
    pairs = [(i, im) for i, c in enumerate(caches) for im in c.image_ids]
    summary.images = len(pairs)

    scale = TARGET_NORM / mean_feature_norm(caches, settings.layer, head, seed=settings.seed, device=device)
    pool_scale = scale if settings.layer == "pool" else TARGET_NORM / mean_feature_norm(caches, "pool", seed=settings.seed, device=device)

    # pass 1: positives (ground-truth boxes, float16) and box-regression samples (to disk)
    positives: list[list[Tensor]] = [[] for _ in range(num_classes)]
    bbox_store = BoxSampleStore(out / "bbox-samples.tmp", caches[0].feature_dim, num_classes) if settings.bbox else None
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
    pos_counts = [sum(len(p) for p in positives[c]) for c in range(num_classes)]
    active = [c for c in range(num_classes) if pos_counts[c]]
    if not active:
        raise ValueError("the training caches hold no ground-truth windows: nothing to train")
    summary.untrained = [classes[c] for c in range(num_classes) if not pos_counts[c]]
    if summary.untrained:
        log.warning("no positives for %s: those classes get no detector", ", ".join(summary.untrained))

    # every feature row the SVMs train on, once: positives (negative keys), then mined windows
    dim = positives[active[0]][0].shape[1]
    negatives = [NegativeCache(settings.retrain_limit) for _ in range(num_classes)]
    pos_keys = np.split(np.arange(sum(pos_counts), dtype=np.int64) - sum(pos_counts), np.cumsum(pos_counts)[:-1])
    store = HalfStore(dim, live=lambda: np.concatenate(pos_keys + [n.keys.numpy() for n in negatives]))
    for c in active:
        store.add(pos_keys[c], torch.cat(positives[c]))
    del positives
    pos_alphas = [np.zeros(n) for n in pos_counts]  # dual variables (dcd warm start)

    # pass 2: hard-negative mining, one epoch
    weights = torch.zeros((dim, num_classes))
    bias = torch.full((num_classes,), UNTRAINED_BIAS)
    retrains = [0] * num_classes
    trained = [False] * num_classes
    objective: dict[int, float] = {}

    def retrain(c: int, last: bool) -> None:
        rows = store.rows(np.concatenate([pos_keys[c], negatives[c].keys.numpy()]))
        npos = pos_counts[c]
        labels = np.concatenate([np.ones(npos), -np.ones(len(rows) - npos)])
        if settings.solver == "dcd":
            warm = np.concatenate([pos_alphas[c], negatives[c].alphas.numpy()])
            w64, b, alpha, _ = solve_dcd(store.data, labels, svm_c * settings.pos_weight, svm_c, settings.bias_mult,
                                         settings.tol, alpha=warm, rows=rows, seed=settings.seed)
            pos_alphas[c], negatives[c].alphas = alpha[:npos], torch.from_numpy(alpha[npos:])
        else:
            examples = torch.from_numpy(store.data[rows])
            w, b = train_linear_svm(examples[:npos], examples[npos:], svm_c, settings.pos_weight, settings.bias_mult,
                                    tol=settings.tol, solver="liblinear")
            w64 = w.double().numpy()
        weights[:, c], bias[c] = torch.from_numpy(w64).float(), b
        trained[c] = True
        retrains[c] += 1
        scores = half_scores(store.data, w64, b, rows)  # [P + Q] float64
        if last:  # the final problem, before eviction (the release evicts after every retraining)
            objective[c] = objective_from_scores(scores, labels, w64, b, svm_c, settings.pos_weight, settings.bias_mult)
            if final_problem is not None:
                examples = torch.from_numpy(store.data[rows])
                final_problem(c, examples[:npos], examples[npos:], weights[:, c].clone(), float(b))
        negatives[c].retrained(torch.from_numpy(scores[npos:]), settings.evict_threshold)

    # the solver releases the GIL: the classes due at an image are retrained on all cores at once
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as solvers:
        for number, image in enumerate(_lazy(caches, pairs, "mining", progress)):
            last = number == len(pairs) - 1
            # only one window per distinct (scale, cells) is a candidate: the release's dedup
            first = distinct_windows(image)[0].sort().values  # [U] window indices, ascending
            feats = window_features(image, settings.layer, head, first, device=device).cpu() * scale  # [U, D]
            overlaps = class_overlaps(image.boxes[first], image.gt_boxes, image.gt_labels, num_classes)  # [U, C]
            keys = (number << WINDOW_BITS) + first  # the window's own index: keys are unique and increasing
            scores = feats @ weights + bias  # [U, C]
            added = torch.zeros(len(first), dtype=torch.bool)
            for c in active:
                cand = torch.nonzero(overlaps[:, c] < settings.negative_iou).flatten()
                added[cand[negatives[c].offer(keys[cand], scores[cand, c] if trained[c] else None, settings.hard_threshold)]] = True
            store.add(keys[added], feats[added])  # a window hard for several classes is stored once
            due = [c for c in active if (not trained[c] or negatives[c].needs_retraining() or last) and len(negatives[c])]
            list(solvers.map(lambda c: retrain(c, last), due))  # classes are independent: solved in parallel
    for c in active:
        if not trained[c]:
            raise ValueError(f"no negative windows for class {classes[c]}")
    summary.positives = {classes[c]: pos_counts[c] for c in range(num_classes)}
    summary.negatives = {classes[c]: len(negatives[c]) for c in range(num_classes)}
    summary.retrains = {classes[c]: retrains[c] for c in range(num_classes)}
    summary.objective = {classes[c]: value for c, value in sorted(objective.items())}
    store.compact()
    summary.distinct_negatives = len(store) - sum(pos_counts)

    if bbox_store is not None:
        regressor = bbox_store.fit(pool_scale, settings.bbox_lambda)
        save_tensors(out / "bbox.npz", regressor.to_tensors())
        summary.bbox_samples = len(bbox_store)
        bbox_store.close()
    meta = {
        "classes": list(classes),
        "layer": settings.layer,
        "head": str(Path(head_folder).resolve()) if head is not None else None,
        "head_key": head_key,
        "feature_scale": scale,
        "C": svm_c,
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
    save_tensors(out / "svm.npz", {"weights": weights, "bias": bias, "feature_scale": torch.tensor(scale)})
    summary.seconds = time.perf_counter() - start
    return summary


def _lazy(
    caches: Sequence[FeatureCache], pairs: list[tuple[int, str]], desc: str, progress: Progress | None
) -> Iterator[CachedImage]:
    """Images loaded one at a time, behind the progress wrapper."""
    seq = track(progress, pairs, desc)
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
