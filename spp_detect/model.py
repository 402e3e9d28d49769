"""A trained detector as one self-contained folder, and detection on images from Python.

A model folder holds everything ``predict`` needs, with no reference to the stage folders
it came from:

* ``model.json``: ``format``; ``backbone``, ``input_norm`` (resolved, by name), ``scales``,
  ``levels``, ``precision`` (the extract settings; ``precision`` absent: ``fp32``); ``weights``: ``{"file", "sha256"}`` (``file`` relative
  to the folder when the weights were copied into it, else absolute; or ``"imagenet"`` /
  ``"none"``); ``classes``; ``layer`` (``pool``/``fc6``/``fc7``); ``proposals`` (the
  selective-search settings); ``detect`` (score threshold, NMS, box regression, ...);
  ``source`` (the manifest keys of the SVM folder and training cache it was exported from);
* ``svm.npz`` (``weights [D, C]``, ``bias [C]``, ``feature_scale``), ``bbox.npz`` when the
  model has box regressors, ``head.npz`` + ``head.json`` for fc6/fc7 models.

:func:`export_model` writes one from a ``train-svm`` folder and one of its training
caches; :func:`load_model` reads it and refuses a weights file whose SHA-256 is not the
recorded one (the SVMs score features of exactly those weights). To move a model to
another machine, export it with ``copy_weights=True`` (``spp-detect export-model
--copy-weights``): the folder then holds the weights too and can be copied as it is.

``load_model(folder).predict(image)`` runs selective search, the conv trunk once per
scale, and the detect stage's scoring on one image in memory: the detections are the
ones ``proposals -> extract -> detect`` give for the same image through the cache, bit for
bit (the conv maps are rounded to fp16 as the cache stores them).

This module reaches into ``proposals`` (selective search) and ``svm`` (the scorers' file
format) inside the functions that need them: it is the one place the packages meet for
end users, as ``cli`` is for the stages.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spp_detect.backbones import NORMALIZATIONS, build_trunk, get_backbone
from spp_detect.cache import CachedImage, FeatureCache
from spp_detect.device import canonical_device
from spp_detect.datasets.result_ids import ResultIds
from spp_detect.detect import DetectSettings, detect_image, prepare_scorer, untrained_classes
from spp_detect.extract import assign_windows
from spp_detect.image_trunk import conv_maps, load_image_rgb, prepare_trunk
from spp_detect.head import load_head, save_head
from spp_detect.stage_dir import (
    Progress,
    atomic_write,
    file_sha256,
    read_manifest,
    settings_config,
    settings_from_config,
    track,
)
from spp_detect.tensor_io import load_tensors, save_tensors
from spp_detect.window_features import PoolBuffer
from spp_detect.windows import scale_factors

__all__ = [
    "MODEL_FORMAT", "ModelError", "Prediction", "DetectionModel", "PredictSettings", "PredictSummary",
    "export_model", "load_model", "coco_results", "run_predict",
]

#: Bumped when the folder layout changes; :func:`load_model` refuses other versions.
MODEL_FORMAT = 1


class ModelError(ValueError):
    """A model folder cannot be made or used as it is; the message says why and what to do."""


@dataclass
class Prediction:
    """Detections of one image.

    Attributes:
        boxes: ``Tensor[K, 4]`` float32, 0-based continuous xyxy in the image's pixels.
        scores: ``Tensor[K]`` float32 SVM scores (margins; 0 is the decision boundary).
        labels: ``Tensor[K]`` int64 class indices into the model's ``classes``.
        class_names: ``K`` names, ``classes[labels[k]]``.
        seconds: wall time of the whole prediction (proposals, conv, scoring), and
            ``timings`` its parts (``proposals``, ``conv``, and detect's ``pool``, ``fc``,
            ``score``, ``nms``).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    class_names: list[str]
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class DetectionModel:
    """A loaded model folder (:func:`load_model`); :meth:`predict` detects on one image."""

    folder: Path
    backbone: str
    weights: str  # a file path, "imagenet" or "none"
    input_norm: str
    scales: tuple[int, ...]
    levels: tuple[int, ...]
    classes: tuple[str, ...]
    scorer: object  # svm.train.SVMModel as ``settings`` score with it (detect.prepare_scorer)
    proposals: object  # proposals.run.ProposalSettings
    settings: DetectSettings
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"  # the trunk's arithmetic, as the cache was extracted
    _plain_scorer: object = field(default=None, repr=False)  # as trained, for other settings
    _trunk: torch.nn.Module | None = field(default=None, repr=False)
    _buffer: PoolBuffer = field(default_factory=PoolBuffer, repr=False)

    def trunk(self) -> torch.nn.Module:
        """The conv trunk with the model's weights (built on first use)."""
        if self._trunk is None:
            self._trunk = prepare_trunk(build_trunk(self.backbone, self.weights), self.device, self.precision)
        return self._trunk

    def propose(self, image_bgr: np.ndarray) -> np.ndarray:
        """Selective-search windows ``np.ndarray[M, 4]`` float32 0-based xyxy, with the
        proposal settings recorded in the model (as ``spp-detect proposals`` computes them)."""
        from proposals.selective_search import propose

        p = self.proposals  # the call proposals.run makes per image
        return propose(image_bgr, p.mode, p.min_size, p.max_boxes, p.seed, p.max_pixels, p.min_size_reference)

    @torch.inference_mode()
    def predict(self, image: np.ndarray | Path | str, proposals: np.ndarray | None = None,
                settings: DetectSettings | None = None, image_id: str = "image") -> Prediction:
        """Detect objects in one image.

        Args:
            image: an image file, or ``np.ndarray[H, W, 3]`` uint8 **RGB** pixels.
            proposals: ``np.ndarray[M, 4]`` 0-based xyxy windows to score; default:
                selective search with the model's settings.
            settings: detection settings; default: the model's (``model.json``'s ``detect``).

        Returns:
            :class:`Prediction`, sorted by class, then decreasing score.
        """
        start = time.perf_counter()
        if isinstance(image, (str, Path)):
            rgb = load_image_rgb(image)
        else:
            rgb = np.asarray(image)
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise ValueError(f"predict: expected an RGB image np.ndarray[H, W, 3] uint8, got {rgb.dtype} {rgb.shape}")
        timings: dict[str, float] = {}
        if proposals is None:
            proposals = self.propose(np.ascontiguousarray(rgb[:, :, ::-1]))
        timings["proposals"] = time.perf_counter() - start
        cached = self.windows_and_maps(rgb, proposals, image_id)
        timings["conv"] = time.perf_counter() - start - timings["proposals"]
        settings = settings or self.settings
        scorer = self.scorer if settings is self.settings else prepare_scorer(self._plain_scorer, settings)
        boxes, scores, labels, detect_timings = detect_image(cached, scorer, settings, self.device, self._buffer)
        timings.update(detect_timings)
        return Prediction(boxes, scores, labels, [self.classes[i] for i in labels.tolist()],
                          time.perf_counter() - start, timings)

    def windows_and_maps(self, rgb: np.ndarray, proposals: np.ndarray, image_id: str = "image") -> CachedImage:
        """What ``extract`` would cache for this image, in memory: conv maps once per scale
        (rounded to fp16 and laid out channels-last, as read back from the cache) and
        every window assigned to its scale and cells.

        Args:
            rgb: ``np.ndarray[H, W, 3]`` uint8 RGB.
            proposals: ``np.ndarray[M, 4]`` 0-based xyxy windows.
        """
        height, width = rgb.shape[:2]
        spec = get_backbone(self.backbone)
        maps = [_as_cached(m) for m in conv_maps(self.trunk(), NORMALIZATIONS[self.input_norm], rgb, self.scales, self.device)]
        boxes = torch.as_tensor(np.asarray(proposals, dtype=np.float32).reshape(-1, 4))
        scale_index, cells = assign_windows(boxes, width, height, self.scales, spec, [tuple(m.shape[1:]) for m in maps])
        return CachedImage(
            image_id=image_id, width=width, height=height, boxes=boxes,
            is_gt=torch.zeros(len(boxes), dtype=torch.bool), scale_index=scale_index, cells=cells, maps=maps,
            map_shapes=torch.tensor([tuple(m.shape) for m in maps], dtype=torch.int64).reshape(-1, 3),
            levels=self.levels, gt_labels=torch.zeros(0, dtype=torch.int64), gt_difficult=torch.zeros(0, dtype=torch.bool),
            scale_factors=scale_factors(width, height, self.scales), stride=spec.stride, offset=spec.offset,
        )


def _as_cached(fmap: Tensor) -> Tensor:
    """``Tensor[C, H, W]`` -> the float32 values of its fp16 rounding, channels-last on the
    CPU: what :func:`spp_detect.cache.decode_map` returns for the stored map."""
    hwc = fmap.detach().to("cpu", torch.float16).permute(1, 2, 0)
    out = torch.empty(hwc.shape, dtype=torch.float32)
    out.copy_(hwc)
    return out.permute(2, 0, 1)


def export_model(
    svm_folder: Path | str,
    cache_folder: Path | str,
    out: Path | str,
    *,
    weights: Path | str | None = None,
    copy_weights: bool = False,
    proposals: object | None = None,
    settings: DetectSettings | None = None,
) -> Path:
    """Write a self-contained model folder from a ``train-svm`` folder.

    Args:
        svm_folder: the trained SVMs (with their head, box regressors if any).
        cache_folder: one of the extract caches the SVMs were trained on: it gives the
            backbone, weights hash, input normalisation, scales, levels and classes.
        out: the model folder to write (created; files in it are replaced).
        weights: the weights file the cache was extracted with (checked by SHA-256); not
            needed for ``imagenet`` / ``none`` weights.
        copy_weights: copy the weights file into the folder (``weights/<name>``), making
            the folder portable: copy it to another machine as it is.
        proposals: selective-search settings recorded for ``predict``, a
            ``proposals.run.ProposalSettings`` (default: its defaults, what ``spp-detect
            proposals`` uses).
        settings: detection settings recorded (default: ``DetectSettings`` with box
            regression on when the model has regressors).

    Returns:
        ``out``.

    Raises:
        ModelError: the cache is not one the SVMs were trained on, it was made in
            crop-warp mode, or ``weights`` is missing or is not the file the cache was made with.
    """
    from proposals.run import ProposalSettings
    from svm.train import load_svm

    svm_folder, out = Path(svm_folder), Path(out)
    scorer = load_svm(svm_folder)
    cache = FeatureCache(cache_folder)
    trained_on = read_manifest(svm_folder)["config"].get("caches", [])
    if cache.key not in trained_on:
        raise ModelError(f"{cache_folder} is not one of the caches the SVMs in {svm_folder} were trained on: "
                         "give one of them (--cache), it records the extract settings")
    if cache.mode != "spp":
        raise ModelError(f"{cache_folder} holds {cache.mode} features: predict runs the SPP path only")
    if tuple(scorer.classes) != tuple(cache.classes):
        raise ModelError(f"the SVMs in {svm_folder} and the cache {cache_folder} have other class lists")
    config = cache.manifest["config"]
    recorded = config["weights"]
    if recorded in ("imagenet", "none"):
        weights_entry = {"file": recorded, "sha256": None}
    else:
        if weights is None:
            raise ModelError(f"{cache_folder} was extracted with the weights file of {recorded}: give that file (--weights)")
        weights = Path(weights)
        if not weights.is_file():
            raise ModelError(f"weights file not found: {weights}")
        digest = file_sha256(weights)
        if f"sha256:{digest}" != recorded:
            raise ModelError(f"{weights} is not the weights file {cache_folder} was extracted with "
                             f"(sha256 {digest[:12]}..., the cache records {recorded.split(':', 1)[1][:12]}...)")
        file = str(weights.resolve())
        if copy_weights:
            target = out / "weights" / weights.name
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda tmp: shutil.copyfile(weights, tmp))
            file = str(target.relative_to(out))
        weights_entry = {"file": file, "sha256": digest}
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "svm.npz", {"weights": scorer.weights, "bias": scorer.bias,
                                   "feature_scale": torch.tensor(scorer.feature_scale)})
    if scorer.regressor is not None:
        save_tensors(out / "bbox.npz", scorer.regressor.to_tensors())
    else:
        (out / "bbox.npz").unlink(missing_ok=True)
    if scorer.head is not None:
        save_head(out, scorer.head)
    else:
        for name in ("head.npz", "head.json"):
            (out / name).unlink(missing_ok=True)
    settings = settings or DetectSettings(bbox=scorer.regressor is not None)
    meta = {
        "format": MODEL_FORMAT,
        "backbone": config["backbone"],
        "weights": weights_entry,
        "input_norm": config["input_norm"],
        "scales": list(cache.scales),
        "levels": list(cache.levels),
        "precision": config.get("precision", "fp32"),
        "classes": list(cache.classes),
        "layer": scorer.layer,
        "proposals": settings_config(proposals or ProposalSettings()),
        "detect": settings_config(settings),
        "source": {"svm": read_manifest(svm_folder)["key"], "cache": cache.key},
        "untrained_classes": untrained_classes(svm_folder),
    }
    atomic_write(out / "model.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    return out


def load_model(folder: Path | str, *, weights: Path | str | None = None, device: torch.device | str = "cpu") -> DetectionModel:
    """Read a model folder written by :func:`export_model`.

    Args:
        weights: use this weights file instead of the recorded path (e.g. on another
            machine); it must have the recorded SHA-256.
        device: where the trunk, pooling and fc layers run.

    Raises:
        FileNotFoundError: not a model folder, or the weights file is gone.
        ModelError: another format version, or a weights file whose SHA-256 is not the
            recorded one (the SVMs were trained on the features of the original file).
    """
    from proposals.run import ProposalSettings
    from svm.bbox_reg import BoxRegressor
    from svm.train import SVMModel

    folder = Path(folder)
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no model.json); make one with spp-detect export-model")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise ModelError(f"{meta_path}: model format {meta.get('format')!r}, this version reads {MODEL_FORMAT}; export it again")
    entry = meta["weights"]
    if entry["sha256"] is None:
        weights_file = entry["file"]
    else:
        path = Path(weights) if weights is not None else folder / entry["file"]  # an absolute file stays absolute
        if not path.is_file():
            raise FileNotFoundError(f"the weights file of model {folder} is missing: {path}; "
                                    "give its new place with --weights (it must have sha256 "
                                    f"{entry['sha256'][:12]}...)")
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise ModelError(f"the weights file {path} changed since model {folder} was made (sha256 {digest[:12]}..., "
                             f"the model records {entry['sha256'][:12]}...): its SVMs score features of the original "
                             "weights; restore that file (or give it with --weights), or retrain")
        weights_file = str(path)
    device = canonical_device(device)
    tensors = load_tensors(folder / "svm.npz")
    classes = tuple(meta["classes"])
    if tensors["weights"].shape[1:] != (len(classes),):
        raise ModelError(f"{folder}/svm.npz does not match the {len(classes)} classes of model.json: damaged or mixed up")
    head = load_head(folder).to(device) if meta["layer"] != "pool" else None
    regressor = BoxRegressor.from_tensors(load_tensors(folder / "bbox.npz")) if (folder / "bbox.npz").is_file() else None
    scorer = SVMModel(weights=tensors["weights"].to(device), bias=tensors["bias"].to(device),
                      feature_scale=float(tensors["feature_scale"]), layer=meta["layer"], classes=classes,
                      head=head, regressor=regressor)
    settings = settings_from_config(DetectSettings, meta["detect"])
    proposals = {"min_size_reference": 0, **meta["proposals"]}  # exported before the scaled minimum: R-CNN's fixed one
    if settings.bbox and regressor is None:
        raise ModelError(f"{meta_path} asks for box regression, but {folder} holds no bbox.npz")
    return DetectionModel(
        folder=folder, backbone=meta["backbone"], weights=weights_file, input_norm=meta["input_norm"],
        scales=tuple(meta["scales"]), levels=tuple(meta["levels"]), classes=classes,
        scorer=prepare_scorer(scorer, settings), proposals=settings_from_config(ProposalSettings, proposals),
        settings=settings, device=device, precision=meta.get("precision", "fp32"), _plain_scorer=scorer,
    )


@dataclass(frozen=True)
class PredictSettings:
    """What ``predict`` draws: detections scoring above ``threshold`` (an SVM margin; 0 is
    the decision boundary), at most ``top`` per image, best first. The json holds every
    detection, as ``detect``'s does."""

    threshold: float = field(default=0.0, metadata={"help": (
        "Draw detections scoring above this (SVM margin; 0 is the decision boundary). The json keeps all.")})
    top: int = field(default=20, metadata={"help": "At most this many boxes drawn per image."})


@dataclass
class PredictSummary:
    """What :func:`run_predict` did: ``seconds`` per image id (in order; decode, proposals,
    conv and scoring), ``detections`` and ``drawn`` per image id, the files written, and
    ``bad`` (images skipped with ``skip_bad``)."""

    seconds: dict[str, float] = field(default_factory=dict)
    detections: dict[str, int] = field(default_factory=dict)
    drawn: dict[str, int] = field(default_factory=dict)
    pictures: list[Path] = field(default_factory=list)
    results_json: Path | None = None
    bad: list[Exception] = field(default_factory=list)

    def describe(self, out: Path | str) -> str:
        """The lines a command prints: one per image (detections, drawn, time), then the total."""
        lines = [f"  {image_id}: {self.detections[image_id]} detections ({self.drawn[image_id]} drawn), {seconds:.2f} s"
                 for image_id, seconds in self.seconds.items()]
        per_image = sum(self.seconds.values()) / max(len(self.seconds), 1)
        lines.append(f"predict: {len(self.seconds)} image(s), {per_image:.2f} s/image, {sum(self.detections.values())} "
                     f"detections -> {out}/detections.json and {len(self.pictures)} PNG(s)")
        return "\n".join(lines)


def coco_results(image_id: str, prediction: Prediction, result_ids: ResultIds | None = None) -> list[dict]:
    """One image's detections as COCO results entries, as ``detect`` writes them in
    ``detections.json``: ``image_id`` the image id string and ``category_id = 1 + label``,
    or with ``result_ids`` (a COCO dataset's) the json's image and category ids;
    ``bbox = [x1, y1, x2 - x1, y2 - y1]`` (float64 of the float32 boxes)."""
    boxes = prediction.boxes.double().reshape(-1, 4)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    coco_image = result_ids.image_id(image_id) if result_ids is not None else image_id
    category = (lambda label: result_ids.category_ids[label]) if result_ids is not None else (lambda label: label + 1)
    return [{"image_id": coco_image, "category_id": category(label), "bbox": box, "score": score}
            for label, box, score in zip(prediction.labels.tolist(), xywh, prediction.scores.double().tolist())]


def run_predict(
    model: DetectionModel,
    images: list,
    out: Path | str,
    settings: PredictSettings = PredictSettings(),
    *,
    skip_bad: bool = False,
    progress: Progress | None = None,
    result_ids: ResultIds | None = None,
) -> PredictSummary:
    """Detect on each image and write ``<out>/<image_id>.png`` (the image with its
    detections drawn as ``settings`` says), ``<out>/detections.json`` (every detection,
    COCO results, :func:`coco_results`) and ``<out>/detections_info.json`` (the model folder and the
    class names the category ids index, as a detect folder records them).

    The json is rewritten after every image, so what was computed before a failure stays.
    Nothing else is written: no proposals or feature cache.

    Args:
        images: objects with ``image_id`` and ``path`` (``PlainImage`` from
            :func:`spp_detect.datasets.image_folder.read_images`).
        skip_bad: an unreadable image is listed in ``bad`` instead of stopping the run.
        progress: the progress protocol (:class:`spp_detect.stage_dir.Progress`), or None.
        result_ids: the images' COCO dataset ids (``predict --coco-json``): the json is
            written in them, and they are recorded in ``detections_info.json``.

    Raises:
        ImageReadError: an image cannot be decoded (unless ``skip_bad``).
    """
    import cv2

    from spp_detect.images import ImageReadError
    from spp_detect.show import picture as draw_picture

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary(results_json=out / "detections.json")
    info = {"model": str(model.folder.resolve()), "classes": list(model.classes),
            "untrained_classes": json.loads((model.folder / "model.json").read_text()).get("untrained_classes", [])}
    if result_ids is not None:
        info["result_ids"] = result_ids.to_json()
    from eval.results import DETECTIONS_INFO

    atomic_write(out / DETECTIONS_INFO, lambda p: p.write_text(json.dumps(info, indent=2)))
    results: list[dict] = []
    for image in track(progress, images, "predict"):
        start = time.perf_counter()
        try:
            rgb = load_image_rgb(image.path)
        except ImageReadError as exc:
            if not skip_bad:
                raise
            summary.bad.append(exc)
            continue
        prediction = model.predict(rgb, image_id=image.image_id)
        summary.seconds[image.image_id] = time.perf_counter() - start
        summary.detections[image.image_id] = len(prediction.scores)
        results += coco_results(image.image_id, prediction, result_ids)
        atomic_write(summary.results_json, lambda p: p.write_text(json.dumps(results)))
        shown = torch.nonzero(prediction.scores > settings.threshold).flatten()
        shown = shown[torch.argsort(prediction.scores[shown], descending=True, stable=True)][: settings.top]
        summary.drawn[image.image_id] = len(shown)
        canvas = draw_picture(rgb, prediction.boxes[shown].numpy(),  # small images: on an enlarged copy
                              [f"{prediction.class_names[i]} {float(prediction.scores[i]):.2f}" for i in shown.tolist()],
                              prediction.labels[shown].tolist())
        picture = out / f"{image.image_id}.png"
        ok, data = cv2.imencode(".png", canvas[:, :, ::-1])
        if not ok:
            raise ModelError(f"cannot encode {picture}")
        atomic_write(picture, lambda p: p.write_bytes(data.tobytes()))
        summary.pictures.append(picture)
    if not results:
        atomic_write(summary.results_json, lambda p: p.write_text("[]"))
    return summary
