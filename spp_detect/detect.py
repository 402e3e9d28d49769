"""The detect stage: score every window of every test image, then NMS, as the release tests.

Per image (``spp_test.m:73-103``, ``imdb_eval_voc.m:65``; docs/sources.md 1.8, 1.9):

1. features of every proposal window (ground-truth windows of the cache are skipped),
   windows sharing cells and scale computed once;
2. per class: keep scores > -1.5, greedy NMS at IoU 0.3 (torchvision ``batched_nms``),
   at most 100 detections per image;
3. with box regression: each kept window regressed for its class (pooled features),
   clipped to the image, and NMS 0.3 run again, as the release's evaluation does before
   writing its result files.

Boxes are 0-based continuous xyxy (IoU in NMS without ``+ 1``; the devkit's rule lives
in ``eval/``). Results are saved per image (``<id>.npz``: ``boxes [K, 4]``, ``scores [K]``,
``labels [K]``), so a killed run resumes where it stopped, and several processes (the
shards of a ``torchrun``/``srun`` job) can fill one folder; the shard that finds every
image done writes the result files from the per-image ones (:func:`write_result_files`).

The model is any object with the attributes of ``svm.train.SVMModel`` (``layer``,
``head``, ``classes``, ``regressor``, ``pooled_dim`` and ``scores(features)``); the
learners are imported only where :func:`run_detect` loads a train-svm folder's model itself.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from eval.results import DETECTIONS_INFO, ClassDetections, Detections
from spp_detect.background_io import Waited, read_ahead, reads_ahead
from spp_detect.boxes import clip_boxes
from spp_detect.cache import CachedImage, FeatureCache
from spp_detect.device import canonical_device
from spp_detect.datasets.result_ids import ResultIds, read_result_ids
from spp_detect.head import PRECISIONS, SPPHead, at_precision, check_head_reads
from spp_detect.stage_dir import BadSetting, Progress, atomic_write, open_stage, settings_config, source_key, track, write_npz
from spp_detect.window_features import PoolBuffer, feature_dim, window_scores

__all__ = [
    "DetectSettings",
    "DetectSummary",
    "Scorer",
    "detect_image",
    "prepare_scorer",
    "run_detect",
    "write_image_detections",
    "write_result_files",
    "load_detections",
    "untrained_classes",
]

SCORE_THRESHOLD: float = -1.5  # spp_test.m: keep z > -1.5
NMS_THRESHOLD: float = 0.3  # spp_test.m / imdb_eval_voc.m:65
MAX_PER_CLASS: int = 100  # spp_test.m: top 100 per class per image


class Scorer(Protocol):
    layer: str
    head: SPPHead | None
    classes: tuple[str, ...]
    regressor: object | None
    pooled_dim: int

    def scores(self, features: Tensor, overwrite_input: bool = False) -> Tensor: ...


@dataclass(frozen=True)
class DetectSettings:
    """How windows become detections (defaults: the release's test, docs/sources.md 1.8)."""

    score_threshold: float = field(default=SCORE_THRESHOLD, metadata={"help": (
        "Keep SVM scores above this (release: -1.5).")})
    nms_threshold: float = field(default=NMS_THRESHOLD, metadata={"help": "Per-class NMS IoU (release: 0.3)."})
    max_per_class: int = field(default=MAX_PER_CLASS, metadata={"help": (
        "Detections per class per image (release: 100).")})
    bbox: bool = field(default=False, metadata={"help": "Apply the model's box regressors (train-svm --bbox)."})
    #: rank of fc6's truncated SVD (Fast R-CNN 3.1), 0 for the exact layer
    svd_rank: int = field(default=0, metadata={"help": (
        "Replace fc6 by its rank-R truncated SVD (Fast R-CNN 3.1): faster, approximate; 0 keeps it exact.")})
    #: arithmetic of fc6 + fc7 (:data:`spp_detect.head.PRECISIONS`)
    precision: str = field(default="fp32", metadata={"help": (
        "fc6/fc7 arithmetic. bf16 rounds weights and input to bfloat16 (float32 sums): 2-5x faster fc on CPUs "
        "with bf16 instructions (AVX512-BF16, AMX) and on GPU tensor cores, approximate (README: its measured mAP cost).")})

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class DetectSummary:
    """What a run did: ``done``/``skipped`` images of this shard, ``detections`` it found;
    ``pending`` images left to other shards (0: this run wrote the result files, holding
    ``total_detections`` over all images)."""

    done: int = 0
    skipped: int = 0
    detections: int = 0
    seconds: float = 0.0
    pending: int = 0
    total_detections: int = 0
    image_set: str = "test"
    #: seconds over the images computed: map decode, pooling, fc layers, SVM scores, NMS
    #: (with thresholds and box regression)
    timings: dict[str, float] = field(
        default_factory=lambda: {"decode": 0.0, "pool": 0.0, "fc": 0.0, "score": 0.0, "nms": 0.0}
    )

    def describe(self, out: Path | str, where: str = "") -> str:
        """The line a command prints; ``where``: this process's shard, e.g. `` [shard 2/4]``."""
        done = (f"detect{where}: {self.done} image(s) computed ({self.seconds / max(self.done, 1):.2f} s/image), "
                f"{self.skipped} already done; ")
        if self.pending:
            return done + (f"{self.pending} image(s) left to other shards: the last to finish writes the result "
                           "files (or rerun detect without a launcher)")
        return done + f"{self.total_detections} detections -> {out}/comp4_det_{self.image_set}_*.txt and {out}/detections.json"


def _per_class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, threshold: float, max_per_class: int) -> Tensor:
    """Indices kept by per-class NMS, at most ``max_per_class`` per class, by score."""
    keep = batched_nms(boxes, scores, labels, threshold)  # sorted by decreasing score
    if len(keep) == 0:
        return keep
    kept_labels = labels[keep]
    # rank of each kept detection within its class (keep is in decreasing score order)
    order = torch.argsort(kept_labels, stable=True)
    sorted_labels = kept_labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - starts
    return keep[rank < max_per_class]


@torch.inference_mode()
def detect_image(
    image: CachedImage,
    model: Scorer,
    settings: DetectSettings,
    device: torch.device | str = "cpu",
    buffer: PoolBuffer | None = None,
) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
    """Detections of one cached image.

    Windows are pooled, run through the head and scored batch by batch
    (:func:`spp_detect.window_features.window_scores`); only their scores are kept. Every
    step (pooling, fc, SVM scores, thresholds, NMS, box regression) runs on ``device``; only
    the detections come back to the CPU.

    Args:
        buffer: reused for the pooled features of each batch (one per run, see
            :class:`spp_detect.window_features.PoolBuffer`).

    Returns:
        ``(boxes Tensor[K, 4] 0-based xyxy, scores Tensor[K], labels Tensor[K] int64 class
        index, timings)``, sorted by class, then decreasing score; ``timings`` holds the
        seconds of ``pool``, ``fc`` (the head, when the model scores fc6/fc7), ``score``
        (the SVMs) and ``nms`` (thresholds, NMS, box regression).
    """
    timings: dict[str, float] = {"pool": 0.0, "fc": 0.0, "score": 0.0, "nms": 0.0}
    buffer = buffer if buffer is not None else PoolBuffer()
    device = canonical_device(device)
    windows = torch.nonzero(~image.is_gt).flatten()
    scores = window_scores(image, model.scores, model.layer, model.head, windows, device=device, buffer=buffer,
                           timings=timings)  # [N, C] on device
    start = time.perf_counter()
    boxes = image.boxes[windows].to(device)
    rows, labels = torch.nonzero(scores > settings.score_threshold, as_tuple=True)
    cand_boxes, cand_scores = boxes[rows], scores[rows, labels]
    keep = _per_class_nms(cand_boxes, cand_scores, labels, settings.nms_threshold, settings.max_per_class)
    rows, labels, out_boxes, out_scores = rows[keep], labels[keep], cand_boxes[keep], cand_scores[keep]
    if settings.bbox:
        check_box_regression(model, settings.bbox)
        kept = windows[rows.cpu()]
        pooled = image.features(kept, device, out=buffer.get(len(kept), feature_dim(image, "pool", None), device))
        out_boxes = clip_boxes(model.regressor.predict(pooled, out_boxes, labels).float(), image.width, image.height)
        keep = _per_class_nms(out_boxes, out_scores, labels, settings.nms_threshold, settings.max_per_class)
        out_boxes, out_scores, labels = out_boxes[keep], out_scores[keep], labels[keep]
    order = torch.argsort(labels.double() * 1e6 - out_scores.double(), stable=True)  # class, then score
    out_boxes, out_scores, labels = out_boxes[order].cpu(), out_scores[order].cpu(), labels[order].cpu()
    timings["nms"] += time.perf_counter() - start  # .cpu() waits for the device: the time is the steps'
    return out_boxes, out_scores, labels, timings


def check_box_regression(model: Scorer, bbox: bool, svm_folder: Path | str | None = None) -> None:
    """The one check that a model asked to regress boxes (``bbox``) has box regressors.

    Raises:
        BadSetting: it has none (``train-svm --bbox`` trains them), naming ``svm_folder``.
    """
    if bbox and model.regressor is None:
        raise BadSetting("bbox", f"{svm_folder or 'the model'} has no box regressors: train it with --bbox, or drop --bbox")


def prepare_scorer(model: Scorer, settings: DetectSettings) -> Scorer:
    """``model`` as ``settings`` score with it: fc6 replaced by its truncated SVD
    (``svd_rank``), the head in bfloat16 (``precision``); a shallow copy when changed.

    Raises:
        ValueError: ``svd_rank`` or ``bf16`` for a model without a fine-tuned head.
    """
    if settings.svd_rank:
        if model.head is None:
            raise ValueError("--svd-rank compresses fc6 of a fine-tuned head; this model scores pooled features")
        from spp_detect.head import truncate_fc

        model = copy.copy(model)
        model.head = truncate_fc(model.head, settings.svd_rank)
    if settings.precision == "bf16":
        if model.head is None:
            raise ValueError("--precision bf16 applies to the fc layers of a fine-tuned head; this model scores pooled features")
        model = copy.copy(model)
        model.head = at_precision(model.head, "bf16")
    return model


def run_detect(
    cache_folder: Path | str,
    svm_folder: Path | str,
    out: Path | str,
    settings: DetectSettings = DetectSettings(),
    *,
    device: torch.device | str = "cpu",
    force: bool = False,
    progress: Progress | None = None,
    shard: tuple[int, int] = (1, 1),
    model: Scorer | None = None,
) -> DetectSummary:
    """Detect on every image of the extract cache ``cache_folder`` with the model of the
    train-svm folder ``svm_folder``; per-image results in ``out``.

    Args:
        svm_folder: the train-svm folder: its manifest key keys ``out`` (with the cache's),
            and ``detections_info.json`` records it (``combine`` finds the model's calibration there).
        model: ``svm_folder``'s model, already loaded (``svm.train.load_svm``), for callers
            that score with it several times; default: loaded here, on ``device``.
        shard: ``(k, n)``, 1-based: this process takes images ``k-1, k-1+n, ...`` of the
            cache (in id order); the n shards may run at once into ``out``. The run that
            finds every image done writes the result files (:func:`write_result_files`).

    Raises:
        SettingsChanged: ``out`` holds other detections and ``force`` is false.
        BadSetting: box regression asked of a model trained without it (``bbox``).
        ValueError: the cache holds no image, or the model's features do not fit it.
    """
    if model is None:
        from svm.train import load_svm

        model = load_svm(svm_folder, device)
    model_key = source_key(Path(svm_folder))
    check_box_regression(model, settings.bbox, svm_folder)
    out = Path(out)
    cache = FeatureCache(cache_folder)
    if not cache.image_ids:
        raise ValueError(f"detect: {cache_folder} holds no images, nothing to detect: was every image of its "
                         "extract skipped as bad? (rerun extract without --skip-bad to see why)")
    expected = model.pooled_dim
    if expected != cache.feature_dim:
        raise ValueError(
            f"the model takes {expected}-d pooled features, but {cache_folder} gives {cache.feature_dim} "
            f"({cache.backbone}, levels {list(cache.levels)}): use a model trained on the same backbone and pyramid"
        )
    if cache.classes and tuple(model.classes) != tuple(cache.classes):  # () : plain images, no annotations
        missing, extra = sorted(set(cache.classes) - set(model.classes)), sorted(set(model.classes) - set(cache.classes))
        raise ValueError(
            f"the model's classes differ from those of {cache_folder}: missing {missing}, extra {extra}"
            + ("" if missing or extra else " (same names, another order)")
        )
    if getattr(model, "head", None) is not None:
        check_head_reads(model.head, cache_folder, cache.weights)
    model = prepare_scorer(model, settings)
    config = {**settings_config(settings), "cache": cache.key, "model": model_key}
    stage = open_stage(out, "detect", config, force=force, shard=shard)
    path_of = lambda image_id: out / f"{image_id}.npz"  # noqa: E731
    todo, skipped, _ = stage.todo(cache.image_ids, path_of)
    summary = DetectSummary(skipped=skipped, image_set=cache.manifest["config"].get("image_set", "test"))
    start = time.perf_counter()
    buffer = PoolBuffer()
    device = canonical_device(device)
    waited = Waited()  # decode: time spent waiting for the next image's maps
    with closing(read_ahead(todo, lambda i: cache.load(i).to(device), background=reads_ahead(device),
                            waited=waited)) as images:
        for image_id in track(progress, todo, "detect", initial=skipped):  # counts images done, not read
            _, image = next(images)
            boxes, scores, labels, timings = detect_image(image, model, settings, device, buffer)
            for name, seconds in timings.items():
                summary.timings[name] += seconds
            write_image_detections(out, image_id, boxes.numpy(), scores.numpy(), labels.numpy())
            summary.done += 1
            summary.detections += len(scores)
    summary.timings["decode"] = waited.seconds
    summary.seconds = time.perf_counter() - start
    if not stage.all_done(cache.image_ids, path_of):  # after our last write: other shards still run
        summary.pending = sum(not path_of(i).is_file() for i in cache.image_ids)
    else:  # the shard that finishes last writes the result files
        info = {"classes": list(model.classes), "image_set": summary.image_set, "svm": str(Path(svm_folder).resolve()),
                "untrained_classes": untrained_classes(svm_folder)}
        result_ids = read_result_ids(cache_folder)  # a COCO dataset's own ids, recorded by extract
        if result_ids is not None:
            info["result_ids"] = result_ids.to_json()
        detections = load_detections(out, model.classes)
        summary.total_detections = write_result_files(out, detections, model.classes, summary.image_set, info)
    return summary


def write_image_detections(folder: Path, image_id: str, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> Path:
    """Write one image's detections (``boxes [K, 4]`` 0-based xyxy, ``scores [K]``,
    ``labels [K]`` class index) to ``<folder>/<image_id>.npz`` atomically."""
    arrays = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "scores": np.asarray(scores, np.float64),
              "labels": np.asarray(labels, np.int64)}
    path = Path(folder) / f"{image_id}.npz"
    write_npz(path, arrays)  # atomic, and the same bytes for the same detections
    return path


def write_result_files(
    out: Path | str, per_class: Detections, classes: Sequence[str],
    image_set: str, info: dict[str, object],
) -> int:
    """The final files of a detections folder from its detections per class (as
    :func:`load_detections` gives them): the devkit's ``comp4_det_<image_set>_<class>.txt``,
    ``detections.json`` (COCO results) and ``detections_info.json`` (``info``: classes, image set,
    where the scores come from, the classes without training examples and, for a COCO
    dataset, its ``result_ids``: ``detections.json`` is then in the dataset json's own
    image and category ids). Returns the number of detections."""
    from eval.results import write_coco_results, write_voc_results

    out = Path(out)
    write_voc_results(per_class, out, image_set, comp_id="comp4", classes=classes)
    result_ids = ResultIds.from_json(info["result_ids"]) if info.get("result_ids") else None
    write_coco_results(per_class, out / "detections.json", classes=classes, result_ids=result_ids)
    atomic_write(out / DETECTIONS_INFO, lambda p: p.write_text(json.dumps(info, indent=2)))
    return sum(len(d) for d in per_class.values())


def untrained_classes(svm_folder: Path | str) -> list[str]:
    """The classes a train-svm folder had no positive of (its ``svm.json``), ``[]`` if none
    or not recorded."""
    meta = Path(svm_folder) / "svm.json"
    return list(json.loads(meta.read_text()).get("untrained_classes") or []) if meta.is_file() else []


def load_detections(folder: Path | str, classes: Sequence[str]) -> Detections:
    """All per-image results of a detect folder, per class (the one detections type,
    :class:`eval.results.ClassDetections`: ``image_ids [K]``, ``scores [K]``, ``boxes [K, 4]``
    0-based xyxy), images in id order; classes without detections left out."""
    folder = Path(folder)
    parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {c: [] for c in range(len(classes))}
    for path in sorted(p for p in folder.glob("*.npz") if not p.name.startswith(".")):
        with np.load(path, allow_pickle=False) as data:
            labels, scores, boxes = data["labels"], data["scores"], data["boxes"].astype(np.float64)
        for c in np.unique(labels):
            rows = labels == c
            parts[int(c)].append((np.full(int(rows.sum()), path.stem), scores[rows], boxes[rows]))
    result = {}
    for c, name in enumerate(classes):
        if parts[c]:
            ids, scores, boxes = (np.concatenate(x) for x in zip(*parts[c]))
            result[name] = ClassDetections(ids, scores, boxes.reshape(-1, 4))
    return result
