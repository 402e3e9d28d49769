"""Model combination (SPP-net paper 4.4 / TPAMI 4.5): the union of several models' scored
windows, then NMS, so that a more confident window of one model suppresses the others'.

Scores of different models are margins of different SVMs and live on different scales.
:class:`ScoreCalibration` maps each model's margins, per class, to the probability that a
detection is correct (IoU >= 0.5 with a ground truth of its class), by a logistic fit on
the model's detections on its *training* images (:func:`fit_calibration`); the union of
calibrated scores compares like with like. The paper combined two ZF-5 nets whose SVMs
were trained the same way and took the plain union (``scores="raw"`` here).

Detections are the one detections type, per class an :class:`eval.results.ClassDetections`
(``image_ids [K]``, ``scores [K]``, ``boxes [K, 4]`` 0-based xyxy), as
:func:`spp_detect.detect.load_detections` reads them.

Both are stages (``spp_detect.stage_dir``): :func:`run_calibrate` fills a keyed folder
(``calibration.npz``, ``calibration.json``) whose manifest records the detect settings it
detected with, and :func:`run_combine` a detections folder like ``detect``'s; ``combine``
refuses a calibration made with other detect settings than the detections it maps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import batched_nms

from spp_detect.cache import FeatureCache
from spp_detect.datasets.registry import class_difference
from eval.results import DETECTIONS_INFO, ClassDetections, Detections
from spp_detect.detect import (
    NMS_THRESHOLD,
    DetectSettings,
    Scorer,
    check_box_regression,
    detect_image,
    load_detections,
    write_image_detections,
    write_result_files,
)
from spp_detect.labels import class_overlaps
from spp_detect.stage_dir import (
    Progress,
    track,
    MANIFEST,
    atomic_write,
    open_stage,
    read_manifest,
    settings_config,
    settings_from_config,
    source_key,
)
from spp_detect.tensor_io import load_tensors, save_tensors

__all__ = [
    "CalibrateSettings",
    "CalibrateSummary",
    "run_calibrate",
    "load_calibration",
    "CombineSettings",
    "CombineSummary",
    "run_combine",
    "ScoreCalibration",
    "union_nms",
    "fit_logistic",
    "fit_calibration",
    "check_compatible",
    "write_per_image",
]

#: A detection counts as correct for the calibration at IoU >= 0.5 (the VOC criterion).
CORRECT_IOU: float = 0.5
#: ``calibrated``: each model's scores mapped to P(correct) first; ``raw``: the paper's plain union (4.4).
SCORE_MODES: tuple[str, ...] = ("calibrated", "raw")
CALIBRATION_FILE = "calibration.npz"


def union_nms(models: Sequence[Detections], nms_threshold: float = 0.3) -> Detections:
    """Union of the models' detections, then greedy NMS per image and class.

    Returns:
        The kept detections per class, sorted by image id, then decreasing score. Classes
        without detections are left out.
    """
    out: Detections = {}
    names = sorted({name for model in models for name in model})
    for name in names:
        parts = [m[name] for m in models if name in m and len(m[name])]
        if not parts:
            continue
        ids = np.concatenate([p.image_ids for p in parts])
        scores = np.concatenate([p.scores for p in parts])
        boxes = np.concatenate([p.boxes for p in parts]).reshape(-1, 4)
        unique_ids, group = np.unique(ids, return_inverse=True)
        keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(group), nms_threshold)
        keep = keep.numpy()
        order = np.lexsort((-scores[keep], group[keep]))  # by image, then score
        keep = keep[order]
        out[name] = ClassDetections(ids[keep], scores[keep], boxes[keep])
    return out


def fit_logistic(scores: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` of ``P(correct | score) = sigmoid(slope * score + intercept)``,
    a maximum-likelihood fit (scikit-learn, regularisation negligible).

    Raises:
        ValueError: fewer than 2 samples of either outcome.
    """
    from sklearn.linear_model import LogisticRegression

    correct = np.asarray(correct, dtype=bool)
    if correct.sum() < 2 or (~correct).sum() < 2:
        raise ValueError(f"a calibration needs correct and wrong detections, got {int(correct.sum())} and {int((~correct).sum())}")
    model = LogisticRegression(C=1e6, max_iter=1000).fit(np.asarray(scores, dtype=np.float64).reshape(-1, 1), correct)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


@dataclass
class ScoreCalibration:
    """Per-class logistic maps from a model's scores to probabilities.

    Attributes:
        slope, intercept: ``Tensor[C]`` float64; ``fitted``: ``Tensor[C]`` bool (a class
            without enough training detections keeps ``sigmoid(score)``: slope 1, intercept 0).
        classes: class names in column order.
    """

    slope: torch.Tensor
    intercept: torch.Tensor
    fitted: torch.Tensor
    classes: tuple[str, ...]

    def apply(self, detections: Detections) -> Detections:
        """The same detections with probabilities for scores."""
        out: Detections = {}
        for name, d in detections.items():
            c = self.classes.index(name)
            z = float(self.slope[c]) * d.scores + float(self.intercept[c])
            out[name] = ClassDetections(d.image_ids, 1.0 / (1.0 + np.exp(-z)), d.boxes)
        return out

    def save(self, path: Path | str) -> Path:
        """Write ``.npz`` (the class names as UTF-8 JSON bytes, so the file stays numeric)."""
        names = np.frombuffer(json.dumps(list(self.classes)).encode(), dtype=np.uint8)
        return save_tensors(path, {"slope": self.slope, "intercept": self.intercept, "fitted": self.fitted, "classes": names})

    @classmethod
    def load(cls, path: Path | str) -> ScoreCalibration:
        t = load_tensors(path)
        classes = tuple(json.loads(bytes(t["classes"].numpy()).decode()))
        return cls(t["slope"], t["intercept"], t["fitted"].bool(), classes)


def fit_calibration(
    cache_folders: Sequence[Path | str],
    model: Scorer,
    settings: DetectSettings = DetectSettings(),
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    correct_iou: float = CORRECT_IOU,
) -> tuple[ScoreCalibration, dict[str, int]]:
    """Fit one logistic map per class on the model's detections on training images.

    Each training image is detected exactly as ``detect`` does (``settings``), and each
    detection is labelled correct when its IoU with a ground truth of its class is
    >= ``correct_iou``.

    Returns:
        ``(calibration, counts)``, ``counts[name]`` the detections the class was fitted on.
    """
    classes = tuple(model.classes)
    per_class_scores: list[list[np.ndarray]] = [[] for _ in classes]
    per_class_correct: list[list[np.ndarray]] = [[] for _ in classes]
    for folder in cache_folders:
        cache = FeatureCache(folder)
        difference = class_difference(classes, cache.classes)
        if difference is not None:
            raise ValueError(f"{folder} holds other classes than the model ({difference}): calibrate on its own training caches")
        ids = cache.image_ids
        for image_id in track(progress, ids, "calibrate"):
            image = cache.load(image_id)
            boxes, scores, labels, _ = detect_image(image, model, settings, device)
            overlaps = class_overlaps(boxes, image.gt_boxes, image.gt_labels, len(classes))  # [K, C]
            correct = overlaps.gather(1, labels[:, None]).flatten() >= correct_iou
            for c in labels.unique().tolist():
                rows = labels == c
                per_class_scores[c].append(scores[rows].numpy())
                per_class_correct[c].append(correct[rows].numpy())
    slope = torch.ones(len(classes), dtype=torch.float64)
    intercept = torch.zeros(len(classes), dtype=torch.float64)
    fitted = torch.zeros(len(classes), dtype=torch.bool)
    counts = {}
    for c, name in enumerate(classes):
        s = np.concatenate(per_class_scores[c]) if per_class_scores[c] else np.zeros(0)
        y = np.concatenate(per_class_correct[c]) if per_class_correct[c] else np.zeros(0, bool)
        counts[name] = len(s)
        try:
            a, b = fit_logistic(s, y)
        except ValueError:
            continue
        slope[c], intercept[c], fitted[c] = a, b, True
    return ScoreCalibration(slope, intercept, fitted, classes), counts


def check_compatible(names: Sequence[str], classes: Sequence[Sequence[str]], image_ids: Sequence[set[str] | None]) -> None:
    """Refuse inputs that cannot be combined, naming the difference.

    Raises:
        ValueError: another class list, or another image set (when known).
    """
    for name, cls, ids in zip(names[1:], classes[1:], image_ids[1:]):
        if tuple(cls) != tuple(classes[0]):
            missing, extra = sorted(set(classes[0]) - set(cls)), sorted(set(cls) - set(classes[0]))
            detail = f"missing {missing}, extra {extra}" if missing or extra else "same classes in another order"
            raise ValueError(f"{name} has other classes than {names[0]}: {detail}")
        if ids is not None and image_ids[0] is not None and ids != image_ids[0]:
            only_a, only_b = sorted(image_ids[0] - ids), sorted(ids - image_ids[0])
            raise ValueError(
                f"{name} covers other images than {names[0]}: {len(only_a)} only in {names[0]} (e.g. {only_a[:3]}), "
                f"{len(only_b)} only in {name} (e.g. {only_b[:3]})"
            )


def write_per_image(folder: Path | str, detections: Detections, classes: Sequence[str],
                    image_ids: set[str] | None = None) -> None:
    """Write ``detections`` as ``detect`` does, one ``<id>.npz`` per image (``image_ids``,
    default the images that have detections), so combined results can be read, shown and
    combined again like any detect folder."""
    parts = list(detections.values())
    ids_all = np.concatenate([d.image_ids for d in parts]) if parts else np.zeros(0, str)
    labels_all = (np.concatenate([np.full(len(d), classes.index(n)) for n, d in detections.items()]) if parts
                  else np.zeros(0, np.int64))
    scores_all = np.concatenate([d.scores for d in parts]) if parts else np.zeros(0)
    boxes_all = np.concatenate([d.boxes for d in parts]) if parts else np.zeros((0, 4))
    order = np.argsort(ids_all, kind="stable")
    ids_sorted = ids_all[order]
    for image_id in sorted(image_ids if image_ids is not None else set(ids_all.tolist())):
        lo, hi = np.searchsorted(ids_sorted, image_id, "left"), np.searchsorted(ids_sorted, image_id, "right")
        rows = order[lo:hi]
        write_image_detections(Path(folder), image_id, boxes_all[rows], scores_all[rows], labels_all[rows])


@dataclass(frozen=True)
class CalibrateSettings:
    """How a model's calibration is fitted: ``detect``, the detect settings its training
    images are detected with (they must be those of the detections it will map: ``combine``
    checks); ``correct_iou``, the IoU at which a detection counts as correct."""

    detect: DetectSettings = DetectSettings()
    correct_iou: float = CORRECT_IOU


@dataclass
class CalibrateSummary:
    """``detections[name]``: training detections the class was fitted on; ``unfitted``:
    classes with too few correct or wrong ones (they keep ``sigmoid(score)``)."""

    detections: dict[str, int] = field(default_factory=dict)
    unfitted: list[str] = field(default_factory=list)
    seconds: float = 0.0
    already_done: bool = False

    def describe(self, out: Path | str) -> str:
        """The lines a command prints (the second, if any, names the classes left unfitted)."""
        fitted = len(self.detections) - len(self.unfitted)
        again = " (already fitted; --force refits)" if self.already_done else ""
        text = f"calibrate: {sum(self.detections.values())} training detections, {fitted} classes fitted{again} -> {out}"
        if self.unfitted:
            text += f"\n  too few correct or wrong detections to fit {', '.join(self.unfitted)}: sigmoid(score) used"
        return text


def run_calibrate(
    cache_folders: Sequence[Path | str],
    svm_folder: Path | str,
    out: Path | str,
    settings: CalibrateSettings = CalibrateSettings(),
    *,
    device: torch.device | str = "cpu",
    force: bool = False,
    progress: Progress | None = None,
    model: Scorer | None = None,
) -> CalibrateSummary:
    """Fit the calibration of the model of the train-svm folder ``svm_folder`` on the
    training caches into the stage folder ``out`` (``calibration.npz``,
    ``calibration.json``); a finished folder is reused unless ``force``.

    Args:
        cache_folders: extract caches of the model's *training* images (never the test set).
        svm_folder: the train-svm folder; its manifest key keys ``out`` (``combine`` checks it).
        model: its model, already loaded (``svm.train.load_svm``); default: loaded here.

    Raises:
        SettingsChanged: ``out`` holds another calibration and ``force`` is false.
        BadSetting: box regression asked of a model trained without it (``bbox``).
    """
    if model is None:
        from svm.train import load_svm

        model = load_svm(svm_folder, device)
    check_box_regression(model, settings.detect.bbox, svm_folder)
    model_key = source_key(Path(svm_folder))
    out = Path(out)
    caches = [FeatureCache(folder) for folder in cache_folders]
    config = {**settings_config(settings), "caches": [c.key for c in caches], "model": model_key}
    open_stage(out, "calibrate", config, force=force)
    summary = CalibrateSummary()
    if (out / CALIBRATION_FILE).is_file():
        info = json.loads((out / "calibration.json").read_text())
        summary.detections, summary.unfitted, summary.already_done = info["detections_per_class"], info["unfitted"], True
        return summary
    start = time.perf_counter()
    calibration, summary.detections = fit_calibration(cache_folders, model, settings.detect, device, progress,
                                                      settings.correct_iou)
    summary.unfitted = [n for n, f in zip(calibration.classes, calibration.fitted.tolist()) if not f]
    info = {"caches": [str(Path(c).resolve()) for c in cache_folders], "detections_per_class": summary.detections,
            "unfitted": summary.unfitted}
    atomic_write(out / "calibration.json", lambda p: p.write_text(json.dumps(info, indent=2)))
    calibration.save(out / CALIBRATION_FILE)  # last: its presence marks the folder finished
    summary.seconds = time.perf_counter() - start
    return summary


def load_calibration(folder: Path | str) -> tuple[ScoreCalibration, CalibrateSettings, str]:
    """``(calibration, the settings it was fitted with, the model key)`` of a calibrate folder.

    Raises:
        FileNotFoundError: not a finished calibrate folder.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("stage") != "calibrate" or not (folder / CALIBRATION_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a finished calibrate folder")
    config = manifest["config"]
    return ScoreCalibration.load(folder / CALIBRATION_FILE), settings_from_config(CalibrateSettings, config), config["model"]


@dataclass(frozen=True)
class CombineSettings:
    """``scores``: ``calibrated`` (each model's calibration applied first) or ``raw`` (the
    paper's plain union, 4.4); ``nms_threshold``: NMS IoU over the union (paper: 0.3);
    ``image_set``: name of the devkit files (None: the inputs' own)."""

    scores: str = field(default="calibrated", metadata={"help": (
        "calibrated: each model's scores mapped per class to P(correct) by the logistic fit that `spp-detect "
        "calibrate` stored for it on its training images, because SVM margins of different models are on "
        "different scales. raw: the paper's plain union of SVM scores (4.4), right for models whose SVMs were"
        " trained alike.")})
    nms_threshold: float = field(default=NMS_THRESHOLD, metadata={"help": "NMS IoU over the union (paper: 0.3)."})
    image_set: str | None = field(default=None, metadata={"help": (
        "Name used for the devkit files [default: the inputs' own].")})

    def __post_init__(self) -> None:
        if self.scores not in SCORE_MODES:
            raise ValueError(f"scores must be one of {SCORE_MODES}, got {self.scores!r}")


@dataclass
class CombineSummary:
    models: int = 0
    detections: int = 0
    image_set: str = "test"
    nms_threshold: float = NMS_THRESHOLD
    scores: str = "calibrated"

    def describe(self, out: Path | str) -> str:
        """The line a command prints."""
        return (f"combine: {self.models} models, {self.detections} detections after NMS {self.nms_threshold:g} "
                f"({self.scores} scores) -> {out}")


def _input_detections(path: Path, settings: CombineSettings) -> tuple[tuple[str, ...], set[str] | None, Detections, str | None]:
    """``(classes, image ids or None, detections, image set)`` of one combine input, its
    calibration applied when ``settings.scores`` is ``calibrated``."""
    from eval.results import read_detections
    from spp_detect.datasets.voc import VOC_CLASSES

    info_path = path / DETECTIONS_INFO
    if not (path.is_dir() and info_path.is_file()):
        if settings.scores == "calibrated":
            raise ValueError(f"{path} is not a detect folder: it has no model to calibrate with; use --scores raw")
        return VOC_CLASSES, None, read_detections(path, settings.image_set or "test"), None
    info = json.loads(info_path.read_text())
    classes = tuple(info["classes"])
    ids = {p.stem for p in path.glob("*.npz") if not p.name.startswith(".")}
    detections = load_detections(path, classes)
    if settings.scores == "calibrated":
        folder = Path(info.get("calibration") or Path(info.get("svm", path)) / "calibration")
        if not (folder / CALIBRATION_FILE).is_file():
            raise ValueError(f"{path}: its model has no score calibration ({folder}); run `spp-detect calibrate --svm "
                             f"{info.get('svm', 'SVM')} --cache TRAIN` or use --scores raw")
        calibration, calibrated_with, model_key = load_calibration(folder)
        if (path / MANIFEST).is_file():
            _check_calibration(path, folder, read_manifest(path)["config"], calibrated_with, model_key)
        detections = calibration.apply(detections)
    return classes, ids, detections, info.get("image_set")


def _check_calibration(path: Path, folder: Path, detect_config: dict, calibrated_with: CalibrateSettings,
                       model_key: str) -> None:
    """Refuse a calibration of another model, or one fitted on detections made otherwise
    (NMS, thresholds, box regression) than ``path``'s; fc precision and SVD rank may differ."""
    if detect_config.get("model") != model_key:
        raise ValueError(f"{folder} calibrates another model than the one of {path}; rerun `spp-detect calibrate`")
    detected = settings_from_config(DetectSettings, detect_config)
    ignored = ("precision", "svd_rank")
    changed = [f"{k}: {getattr(calibrated_with.detect, k)!r} vs {getattr(detected, k)!r}"
               for k in settings_config(detected) if k not in ignored and getattr(calibrated_with.detect, k) != getattr(detected, k)]
    if changed:
        raise ValueError(f"{folder} was fitted on detections made with other settings than {path} ({'; '.join(changed)}); "
                         "rerun `spp-detect calibrate` with the detect options of the detections")


def _shared_info(inputs: Sequence[Path]) -> dict:
    """What the inputs' ``detections_info.json`` files say that the combination inherits: the COCO
    dataset ids they are named in (``result_ids``; refused if two inputs differ) and the
    classes none of the models had a training example of (``untrained_classes``, when
    every input records them).

    Raises:
        ValueError: two inputs are named in other dataset ids.
    """
    from eval.results import detections_info

    infos = [detections_info(p) for p in inputs]
    shared: dict = {}
    recorded = [(p, i["result_ids"]) for p, i in zip(inputs, infos) if i.get("result_ids")]
    for path, ids in recorded[1:]:
        if (ids["category_ids"], ids["images"]) != (recorded[0][1]["category_ids"], recorded[0][1]["images"]):
            raise ValueError(f"{path} and {recorded[0][0]} name their images or classes in other dataset ids "
                             f"({ids.get('source')} vs {recorded[0][1].get('source')}): combine detections of one dataset")
    if recorded:
        shared["result_ids"] = recorded[0][1]
    if infos and all("untrained_classes" in i for i in infos):
        shared["untrained_classes"] = [c for c in infos[0]["untrained_classes"]
                                       if all(c in i["untrained_classes"] for i in infos[1:])]
    return shared


def run_combine(
    inputs: Sequence[Path | str],
    out: Path | str,
    settings: CombineSettings = CombineSettings(),
    *,
    force: bool = False,
) -> CombineSummary:
    """Combine the detections of two or more models into the detections folder ``out``
    (per-image ``.npz``, devkit comp4 files, ``detections.json``, ``detections_info.json``).

    Args:
        inputs: detect (or combine) folders; with ``scores="raw"`` also devkit result
            folders or COCO json files.

    Raises:
        ValueError: fewer than two inputs, inputs of other classes or images (named), a
            missing or mismatched calibration.
        SettingsChanged: ``out`` holds another combination and ``force`` is false.
    """
    inputs = [Path(p) for p in inputs]
    if len(inputs) < 2:
        raise ValueError("give --detections at least twice: combine joins two or more models")
    names = [str(p) for p in inputs]
    classes, image_ids, arrays, image_sets = zip(*(_input_detections(p, settings) for p in inputs))
    check_compatible(names, classes, image_ids)
    keys = [source_key(p) if (p / MANIFEST).is_file() else str(p.resolve()) for p in inputs]
    open_stage(out, "combine", {**settings_config(settings), "inputs": keys}, force=force)
    merged = union_nms(list(arrays), settings.nms_threshold)
    known = [ids for ids in image_ids if ids is not None]
    write_per_image(out, merged, classes[0], set().union(*known) if known else None)
    image_set = settings.image_set or next((s for s in image_sets if s), "test")
    info = {"combined": names, "scores": settings.scores, "classes": list(classes[0]), "image_set": image_set,
            **_shared_info(inputs)}
    count = write_result_files(out, merged, classes[0], image_set, info)
    return CombineSummary(models=len(inputs), detections=count, image_set=image_set, nms_threshold=settings.nms_threshold,
                          scores=settings.scores)
