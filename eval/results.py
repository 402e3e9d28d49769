"""Detections in memory, and the two standard result formats on disk.

In memory, detections follow the project's box convention (:mod:`spp_detect.boxes`):
:data:`Detections` maps a class name to one :class:`ClassDetections` of parallel arrays
``image_ids [K] str``, ``scores [K] float64``, ``boxes [K, 4] float64`` (0-based continuous
xyxy in original-image pixels). Boxes are float64, not the float32 used elsewhere, so
that values read from the devkit's text files (which the devkit parses as doubles)
survive the round trip unchanged.

On disk:

* **VOC devkit result files**, one per class: ``<comp_id>_det_<image_set>_<class>.txt``
  (``VOCopts.detrespath``), one detection a line ``<image_id> <score> <x1> <y1> <x2> <y2>``
  in the devkit's 1-based inclusive pixel frame: ``(x1 + 1, y1 + 1, x2, y2)`` of the
  0-based box (the inverse of :func:`spp_detect.boxes.from_voc_1based`). Values are
  written with full float64 precision (``repr``), unlike py-faster-rcnn's ``{:.3f}``
  scores, which create ties (docs/sources.md 3.2).
* **COCO results json**: a list of ``{"image_id", "category_id", "bbox", "score"}`` with
  ``bbox = [x1, y1, x2 - x1, y2 - y1]`` (COCO's xywh, continuous, no ``+ 1``). For a
  COCO dataset (given its :class:`~spp_detect.datasets.result_ids.ResultIds`) the ids are
  the dataset json's own: ``image_id`` its ``images[].id``, ``category_id`` its
  ``categories[].id``, so that the file loads with ``pycocotools.COCO.loadRes`` against
  that json unchanged. Otherwise (VOC, plain images) ``image_id`` is the image id string
  (``"000001"``) and ``category_id = 1 + index`` in the class list (VOC's
  :data:`~spp_detect.datasets.voc.VOC_CLASSES` by default). Readers tell the two apart by
  the type of ``image_id``: an integer is a dataset id when the ids are known (recorded
  in the ``detections_info.json`` beside the file, or given), a string is an image id string.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spp_detect.boxes import from_voc_1based, to_voc_1based
from spp_detect.datasets.result_ids import ResultIds
from spp_detect.datasets.voc import VOC_CLASSES
from spp_detect.stage_dir import atomic_write

__all__ = [
    "ClassDetections",
    "Detections",
    "DetectionsError",
    "to_devkit_frame",
    "from_devkit_frame",
    "voc_results_path",
    "write_voc_results",
    "read_voc_results",
    "results_image_set",
    "detections_to_coco",
    "detections_from_coco",
    "write_coco_results",
    "read_coco_results",
    "read_detections",
    "recorded_result_ids",
    "detections_info",
]

logger = logging.getLogger(__name__)


class DetectionsError(ValueError):
    """Detections are malformed or do not fit the ground truth; the message says where."""


@dataclass(frozen=True)
class ClassDetections:
    """All detections of one class over an image set (parallel arrays, any order).

    Attributes:
        image_ids: ``np.ndarray[K]`` of ``str``, the VOC image id of each detection.
        scores: ``np.ndarray[K]`` float64, higher is more confident; finite or ``inf``.
        boxes: ``np.ndarray[K, 4]`` float64, 0-based continuous ``(x1, y1, x2, y2)`` in
            original-image pixels.
    """

    image_ids: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray

    def __post_init__(self) -> None:
        image_ids = np.asarray(self.image_ids, dtype=str).reshape(-1)
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        boxes = np.asarray(self.boxes, dtype=np.float64)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise DetectionsError(f"[ClassDetections] boxes must have shape [K, 4], got {boxes.shape}")
        if not len(image_ids) == len(scores) == len(boxes):
            raise DetectionsError(
                "[ClassDetections] image_ids, scores and boxes must have the same length, got "
                f"{len(image_ids)}, {len(scores)}, {len(boxes)}"
            )
        if np.isnan(scores).any():
            raise DetectionsError("[ClassDetections] scores contain NaN")
        if not np.isfinite(boxes).all():
            raise DetectionsError("[ClassDetections] boxes contain NaN or infinite coordinates")
        object.__setattr__(self, "image_ids", image_ids)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "boxes", boxes)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> ClassDetections:
        """No detections."""
        return cls(np.empty(0, dtype=str), np.empty(0), np.empty((0, 4)))

    @classmethod
    def concatenate(cls, parts: Iterable[ClassDetections]) -> ClassDetections:
        """Join several ``ClassDetections`` (e.g. one per image) in the given order."""
        parts = list(parts)
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.image_ids for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.boxes for p in parts]),
        )


#: Detections of a whole image set: class name -> :class:`ClassDetections`. A missing
#: class means no detections of that class.
Detections = dict[str, ClassDetections]


# ----------------------------------------------------------------------- the devkit frame
def to_devkit_frame(boxes: np.ndarray) -> np.ndarray:
    """0-based continuous xyxy -> the devkit's 1-based inclusive pixels, in float64.

    ``(x1 + 1, y1 + 1, x2, y2)`` (:func:`spp_detect.boxes.to_voc_1based`) in float64, so
    that coordinates read from devkit files come back bit for bit in the devkit frame
    (``(v - 1) + 1 == v`` for ``v >= 0.5``); the 0-based values of a written and re-read
    box may differ by an ulp.

    Args:
        boxes: ``[K, 4]`` 0-based ``(x1, y1, x2, y2)``.

    Returns:
        ``np.ndarray[K, 4]`` float64, 1-based inclusive ``(xmin, ymin, xmax, ymax)``.
    """
    return to_voc_1based(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def from_devkit_frame(boxes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_devkit_frame` (float64 :func:`spp_detect.boxes.from_voc_1based`)."""
    return from_voc_1based(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


# ----------------------------------------------------------------------- devkit files
def voc_results_path(out_dir: Path | str, image_set: str, class_name: str, comp_id: str = "comp4") -> Path:
    """``<out_dir>/<comp_id>_det_<image_set>_<class_name>.txt`` (the devkit's ``detrespath``)."""
    return Path(out_dir) / f"{comp_id}_det_{image_set}_{class_name}.txt"


def write_voc_results(
    detections: Mapping[str, ClassDetections],
    out_dir: Path | str,
    image_set: str,
    *,
    comp_id: str = "comp4",
    classes: Sequence[str] = VOC_CLASSES,
) -> list[Path]:
    """Write one devkit result file per class (an empty file for a class without detections).

    Lines are ``<image_id> <score> <x1> <y1> <x2> <y2>`` in the devkit's 1-based frame
    (see :func:`to_devkit_frame`), in the order of the arrays, with ``repr`` precision.
    Each file is written atomically.

    Returns:
        The written paths, in ``classes`` order.

    Raises:
        DetectionsError: ``detections`` names a class outside ``classes``.
    """
    _check_class_names(detections, classes)
    paths = []
    for class_name in classes:
        dets = detections.get(class_name, ClassDetections.empty())
        boxes = to_devkit_frame(dets.boxes)
        lines = [
            f"{image_id} {score!r} {b[0]!r} {b[1]!r} {b[2]!r} {b[3]!r}\n"
            for image_id, score, b in zip(dets.image_ids.tolist(), dets.scores.tolist(), boxes.tolist())
        ]
        path = voc_results_path(out_dir, image_set, class_name, comp_id)
        atomic_write(path, lambda tmp, lines=lines: tmp.write_text("".join(lines)))
        paths.append(path)
    return paths


def read_voc_results(
    directory: Path | str,
    image_set: str,
    *,
    comp_id: str | None = None,
    classes: Sequence[str] = VOC_CLASSES,
) -> Detections:
    """Read the devkit result files of ``directory`` into 0-based in-memory detections.

    Args:
        directory: folder with ``<comp_id>_det_<image_set>_<class>.txt`` files.
        image_set: e.g. ``"test"``.
        comp_id: file prefix (e.g. ``"comp4"``); ``None`` accepts any single
            ``*_det_<image_set>_<class>.txt`` per class.
        classes: the class names to look for.

    Returns:
        One entry per class file found. A missing class file is logged as a warning and
        left out (that class then scores AP 0).

    Raises:
        DetectionsError: no file for any class, several candidate files for one class,
            or a malformed line (the message names the file and the line number).
    """
    directory = Path(directory)
    image_set = results_image_set(directory, image_set, classes)
    detections: Detections = {}
    missing = []
    for class_name in classes:
        if comp_id is not None:
            candidates = [voc_results_path(directory, image_set, class_name, comp_id)]
            candidates = [p for p in candidates if p.is_file()]
        else:
            candidates = sorted(directory.glob(f"*_det_{image_set}_{class_name}.txt"))
        if len(candidates) > 1:
            raise DetectionsError(
                f"several result files for class {class_name!r} in {directory}: "
                f"{', '.join(p.name for p in candidates)}; choose one with --comp-id"
            )
        if not candidates:
            missing.append(class_name)
            continue
        detections[class_name] = _read_devkit_file(candidates[0])
    prefix = f"{comp_id}_det_{image_set}_" if comp_id is not None else f"*_det_{image_set}_"
    if not detections:
        present = _image_sets_present(directory, classes)
        hint = f" (it holds result files of image set {', '.join(map(repr, present))})" if present else ""
        raise DetectionsError(f"no devkit result files {prefix}<class>.txt in {directory}{hint}")
    if missing:
        logger.warning("no result file %s<class>.txt in %s for: %s (AP 0)", prefix, directory, ", ".join(missing))
    return detections


def results_image_set(directory: Path | str, image_set: str, classes: Sequence[str] = VOC_CLASSES) -> str:
    """The image-set name in the devkit result file names of ``directory``: ``image_set``
    when files ``*_det_<image_set>_<class>.txt`` are there, else the name recorded in the
    folder's ``detections_info.json`` if its files are there (a detect or combine folder names them
    after its cache's image set, e.g. a COCO json's stem at extract time, which a renamed
    json no longer has). Returns ``image_set`` when neither has files (the caller reports it)."""
    directory = Path(directory)

    def has_files(name: str) -> bool:
        return any(any(directory.glob(f"*_det_{name}_{c}.txt")) for c in classes)

    recorded = detections_info(directory).get("image_set")
    if has_files(image_set) or not isinstance(recorded, str) or not has_files(recorded):
        return image_set
    logger.info("%s: result files are named after image set %r, not %r: reading those", directory, recorded, image_set)
    return recorded


def _image_sets_present(directory: Path, classes: Sequence[str]) -> list[str]:
    """The image-set names of the devkit result files in ``directory`` (for messages)."""
    return sorted({p.name.split("_det_", 1)[1][: -len(f"_{c}.txt")] for c in classes
                   for p in directory.glob(f"*_det_*_{c}.txt")})


def _read_devkit_file(path: Path) -> ClassDetections:
    image_ids, numbers = [], []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 6:
                    raise ValueError
                values = [float(v) for v in fields[1:]]
            except ValueError:
                raise DetectionsError(
                    f"{path}:{line_no}: expected '<image_id> <score> <x1> <y1> <x2> <y2>', got {line.rstrip()!r}"
                ) from None
            if math.isnan(values[0]) or not all(math.isfinite(v) for v in values[1:]):
                raise DetectionsError(f"{path}:{line_no}: NaN or infinite value in {line.rstrip()!r}")
            image_ids.append(fields[0])
            numbers.append(values)
    array = np.asarray(numbers, dtype=np.float64).reshape(-1, 5)
    return ClassDetections(np.asarray(image_ids, dtype=str), array[:, 0], from_devkit_frame(array[:, 1:]))


# ----------------------------------------------------------------------- COCO json
def detections_to_coco(
    detections: Mapping[str, ClassDetections], classes: Sequence[str] = VOC_CLASSES,
    result_ids: ResultIds | None = None,
) -> list[dict]:
    """In-memory detections -> COCO results list (``bbox`` xywh = ``(x1, y1, x2 - x1, y2 - y1)``).

    Classes are emitted in ``classes`` order, detections in array order. With
    ``result_ids`` (a COCO dataset's), ``image_id`` and ``category_id`` are the dataset
    json's ids; without, the image id string and ``1 + classes.index(name)``.

    Raises:
        DetectionsError: a class outside ``classes``, or (with ``result_ids``) an image
            the dataset json does not list, or ids for another number of classes.
    """
    _check_class_names(detections, classes)
    if result_ids is not None and len(result_ids.category_ids) != len(classes):
        raise DetectionsError(f"{len(result_ids.category_ids)} category ids of {result_ids.source} for {len(classes)} classes")
    results = []
    for label, class_name in enumerate(classes):
        dets = detections.get(class_name)
        if dets is None:
            continue
        category_id = result_ids.category_ids[label] if result_ids is not None else label + 1
        xywh = dets.boxes.copy()
        xywh[:, 2:] -= xywh[:, :2]  # COCO boxes: [x, y, width, height], no + 1
        image_ids = dets.image_ids.tolist()
        if result_ids is not None:
            try:
                image_ids = [result_ids.image_id(i) for i in image_ids]
            except KeyError as exc:
                raise DetectionsError(str(exc.args[0])) from None
        for image_id, score, box in zip(image_ids, dets.scores.tolist(), xywh.tolist()):
            results.append({"image_id": image_id, "category_id": category_id, "bbox": box, "score": score})
    return results


def detections_from_coco(
    results: Sequence[Mapping], classes: Sequence[str] = VOC_CLASSES, source: str = "COCO results",
    result_ids: ResultIds | None = None,
) -> Detections:
    """COCO results list -> in-memory detections (``(x, y, w, h)`` -> ``(x, y, x + w, y + h)``).

    An entry whose ``image_id`` is a string names the image by its id string, its class by
    ``category_id = 1 + index``. An integer ``image_id`` is the dataset json's image id when
    ``result_ids`` is given (``category_id`` then its category id), else it is read as its
    decimal string (with ``category_id = 1 + index``).

    Raises:
        DetectionsError: an entry without the four keys, a ``category_id`` or ``image_id``
            the ids do not know (``1..len(classes)`` without dataset ids), or a bbox that is
            not four numbers; the message names ``source`` and the entry's index.
    """
    if not isinstance(results, Sequence) or isinstance(results, (str, bytes)):
        raise DetectionsError(f"{source}: expected a json list of detections, got {type(results).__name__}")
    if result_ids is not None and len(result_ids.category_ids) != len(classes):
        raise DetectionsError(f"{source}: {len(result_ids.category_ids)} category ids of {result_ids.source} "
                              f"for {len(classes)} classes")
    per_class: dict[int, tuple[list, list, list]] = {}
    for index, entry in enumerate(results):
        try:
            image_id = entry["image_id"]
            category_id = entry["category_id"]
            score = float(entry["score"])
            box = [float(v) for v in entry["bbox"]]
            if isinstance(image_id, bool) or not isinstance(image_id, (str, int)):
                raise TypeError(f"image_id must be a string or an integer, got {image_id!r}")
            if isinstance(category_id, bool) or not isinstance(category_id, int):
                raise TypeError(f"category_id must be an integer, got {category_id!r}")
            if result_ids is not None and isinstance(image_id, int):  # the dataset json's ids
                label, image_id = _from_dataset_ids(result_ids, category_id, image_id)
            elif not 1 <= category_id <= len(classes):
                raise ValueError(f"category_id {category_id} outside 1..{len(classes)}")
            else:
                label = category_id - 1
            if len(box) != 4:
                raise ValueError(f"bbox must be [x, y, w, h], got {entry['bbox']!r}")
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise DetectionsError(f"{source}: entry {index}: {detail}") from None
        ids, scores, boxes = per_class.setdefault(label, ([], [], []))
        ids.append(str(image_id))
        scores.append(score)
        boxes.append(box)
    detections: Detections = {}
    for label, (ids, scores, boxes) in sorted(per_class.items()):
        xyxy = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        xyxy[:, 2:] += xyxy[:, :2]
        try:
            detections[classes[label]] = ClassDetections(np.asarray(ids, dtype=str), scores, xyxy)
        except DetectionsError as exc:
            raise DetectionsError(f"{source}: category {classes[label]!r}: {exc}") from None
    return detections


def _from_dataset_ids(result_ids: ResultIds, category_id: int, image_id: int) -> tuple[int, str]:
    """``(class index, image id string)`` of a results entry in a dataset json's ids.

    Raises:
        ValueError: an id the dataset json does not have.
    """
    try:
        return result_ids.label(category_id), result_ids.stem(image_id)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None


def write_coco_results(
    detections: Mapping[str, ClassDetections], path: Path | str, classes: Sequence[str] = VOC_CLASSES,
    result_ids: ResultIds | None = None,
) -> Path:
    """Write :func:`detections_to_coco` as a json file (atomically); returns the path."""
    results = detections_to_coco(detections, classes, result_ids)
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(results)))
    return path


#: What a detections folder (``detect``, ``combine``, ``predict``) records beside its results
#: (a model folder's own description is ``model.json``, :mod:`spp_detect.model`).
DETECTIONS_INFO = "detections_info.json"


def detections_info(path: Path | str) -> dict:
    """The ``detections_info.json`` of a detections folder (``path`` the folder or a file in it: what
    ``detect``, ``combine`` and ``predict`` write beside their results: ``classes``,
    ``image_set``, ``result_ids``, ``untrained_classes``, ...), or ``{}``."""
    path = Path(path)
    info = (path if path.is_dir() else path.parent) / DETECTIONS_INFO
    try:
        recorded = json.loads(info.read_text()) if info.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def check_detections_classes(path: Path | str, classes: Sequence[str]) -> None:
    """Refuse detections whose folder records other classes (:func:`detections_info`) than
    ``classes``, the ground truth's: their category ids would name other classes.

    Raises:
        DetectionsError: naming the difference and the file that records it.
    """
    from spp_detect.datasets.registry import class_difference

    recorded = detections_info(path).get("classes")
    difference = class_difference(classes, recorded) if recorded is not None else None
    if difference is not None:
        info = (Path(path) if Path(path).is_dir() else Path(path).parent) / DETECTIONS_INFO
        raise DetectionsError(f"{path} holds detections of other classes than the ground truth ({difference} in {info}): "
                              "evaluate against the dataset the model was trained for")


def recorded_result_ids(path: Path | str) -> ResultIds | None:
    """The dataset ids recorded beside detections (:func:`detections_info`), or ``None``."""
    recorded = detections_info(path).get("result_ids")
    return ResultIds.from_json(recorded) if recorded else None


def read_coco_results(path: Path | str, classes: Sequence[str] = VOC_CLASSES,
                      result_ids: ResultIds | None = None) -> Detections:
    """Read a COCO results json into in-memory detections (see :func:`detections_from_coco`);
    integer ids are read with the ids recorded beside the file (:func:`recorded_result_ids`),
    else with ``result_ids`` (the dataset's the detections are scored against)."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DetectionsError(f"{path}: not a COCO results json ({exc})") from None
    return detections_from_coco(results, classes, source=str(path), result_ids=recorded_result_ids(path) or result_ids)


def read_detections(
    path: Path | str, image_set: str, *, comp_id: str | None = None, classes: Sequence[str] = VOC_CLASSES,
    result_ids: ResultIds | None = None,
) -> Detections:
    """A folder of devkit result files (:func:`read_voc_results`) or a COCO json file
    (:func:`read_coco_results`, ``result_ids`` for a json in a COCO dataset's ids)."""
    path = Path(path)
    if path.is_dir():
        return read_voc_results(path, image_set, comp_id=comp_id, classes=classes)
    return read_coco_results(path, classes, result_ids)


def _check_class_names(detections: Mapping[str, ClassDetections], classes: Sequence[str]) -> None:
    unknown = sorted(set(detections) - set(classes))
    if unknown:
        raise DetectionsError(f"detections for unknown classes {unknown}; expected names from {list(classes)}")
