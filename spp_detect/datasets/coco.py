"""COCO-format detection datasets (``instances.json`` + an image folder), as most labelling
tools export them (CVAT, Label Studio, Roboflow).

What is read, and how it maps onto the project's conventions:

* ``categories`` give the class list, **sorted by category id**: label ``i`` is the
  ``i``-th category in id order, ``classes[i]`` its ``name``. Ids need not be 1..K.
* ``images``: ``file_name`` relative to the images folder; the project's image id is the
  file name's stem (``"000001.jpg"`` -> ``"000001"``), which names every per-image file
  of the later stages. Two images with the same stem are refused.
* ``annotations``: ``bbox = [x, y, w, h]`` in continuous 0-based pixels becomes
  ``(x, y, x + w, y + h)``, the project's 0-based xyxy (:mod:`spp_detect.boxes`), once,
  here. ``iscrowd = 1`` objects are ignore regions, stored as VOC's ``difficult`` flag
  (the devkit and pycocotools both neither reward nor punish a detection on them).
* Results files are written back in the json's own ids (``images[].id``,
  ``categories[].id``): the dataset's :class:`~spp_detect.datasets.result_ids.ResultIds`
  (``coco_ids`` and ``category_ids`` here) travel with its images to ``detections.json``.

Odd annotations, as users' exports have them, are handled as follows and counted in
:class:`COCOStats`: a box running past the image edge is clipped to it; a box of zero
width or height (also after clipping) is dropped; an image without annotations is a
normal image with no objects. A negative or non-finite size, an unknown ``category_id``
or ``image_id``, or a missing image file is a :class:`COCOFormatError` whose one-line
message names the json file and the annotation (or image).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

__all__ = ["COCOFormatError", "COCOImage", "COCOStats", "COCODataset", "read_coco"]


class COCOFormatError(ValueError):
    """A COCO json (or an image it lists) is missing or malformed; the message names the
    file and the entry. ``image_id`` is the image it belongs to (``None`` for the file)."""

    image_id: str | None = None


@dataclass(frozen=True)
class COCOImage:
    """One image of a COCO dataset (the same attributes as :class:`~spp_detect.datasets.voc.VOCImage`).

    Attributes:
        image_id: the file name's stem, e.g. ``"000001"``.
        path: the image file.
        width, height: image size in pixels (the json's ``width``/``height``).
        boxes: ``np.ndarray[K, 4]`` float32, 0-based continuous xyxy in image pixels.
        labels: ``np.ndarray[K]`` int64, indices into the dataset's ``classes``.
        difficult: ``np.ndarray[K]`` bool, ``iscrowd`` (ignore regions).
        coco_id: the json's ``id`` of the image (results json and pycocotools use it).
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    coco_id: int


@dataclass
class COCOStats:
    """What reading changed: ``clipped`` boxes (past the image edge), ``dropped`` boxes (zero
    width or height), ``empty_images`` (no object left), each with the first few annotation
    ids in ``examples``."""

    clipped: int = 0
    dropped: int = 0
    empty_images: int = 0
    examples: dict[str, list[int]] = field(default_factory=lambda: {"clipped": [], "dropped": []})

    def describe(self) -> str:
        """One line, e.g. ``"2 boxes clipped to the image (ids 7, 9), 1 zero-size box dropped (id 4)"``."""

        def ids(kind: str) -> str:
            shown = self.examples[kind][:5]
            more = ", ..." if getattr(self, kind) > len(shown) else ""
            return f" (annotation id{'s' if len(shown) > 1 else ''} {', '.join(map(str, shown))}{more})" if shown else ""

        return (f"{self.clipped} box(es) clipped to the image{ids('clipped')}, "
                f"{self.dropped} zero-size box(es) dropped{ids('dropped')}, {self.empty_images} image(s) without objects")


@dataclass
class COCODataset:
    """Result of :func:`read_coco`: ``images`` in the json's order, ``classes`` and their
    ``category_ids`` (both in id order), ``stats``, and ``bad`` (entries skipped, each a
    :class:`COCOFormatError`, when reading with ``skip_bad``); ``coco_ids``: file stem ->
    ``images[].id`` of every image the json lists (also those past ``limit`` or skipped),
    ``beyond_limit``: the stems of the images past ``limit``, in json order."""

    json_path: Path
    images: list[COCOImage]
    classes: tuple[str, ...]
    category_ids: tuple[int, ...]
    stats: COCOStats
    bad: list[COCOFormatError] = field(default_factory=list)
    coco_ids: dict[str, int] = field(default_factory=dict)
    beyond_limit: tuple[str, ...] = ()


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise COCOFormatError(f"COCO json not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise COCOFormatError(f"{path}: not valid json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("categories"), list):
        raise COCOFormatError(f"{path}: not a COCO dataset (expected an object with 'images', 'annotations' and 'categories' lists)")
    return data


def _categories(path: Path, categories: list) -> tuple[tuple[str, ...], tuple[int, ...]]:
    try:
        pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
    except (KeyError, TypeError, ValueError) as exc:
        raise COCOFormatError(f"{path}: every category needs an integer 'id' and a 'name' ({exc!r})") from None
    if not pairs:
        raise COCOFormatError(f"{path}: no categories: the class list comes from them")
    ids, names = [p[0] for p in pairs], [p[1] for p in pairs]
    for what, values in (("id", ids), ("name", names)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise COCOFormatError(f"{path}: category {what}(s) {repeated} appear more than once")
    return tuple(names), tuple(ids)


def read_coco(
    json_path: Path | str,
    images_dir: Path | str,
    *,
    limit: int | None = None,
    skip_bad: bool = False,
) -> COCODataset:
    """Read a COCO detection dataset; boxes converted to 0-based xyxy here.

    Args:
        json_path: the annotation file (``instances_*.json``).
        images_dir: the folder the ``file_name`` entries are relative to.
        limit: only the first ``limit`` images of the json's ``images`` list.
        skip_bad: an image whose file is missing or whose annotations are malformed
            (unknown category, bad bbox) is left out and listed in ``bad`` instead of
            raising. A json that cannot be read still raises.

    Returns:
        :class:`COCODataset`.

    Raises:
        COCOFormatError: the message names ``json_path`` and the image or annotation id.
    """
    path = Path(json_path)
    images_dir = Path(images_dir)
    data = _load_json(path)
    classes, category_ids = _categories(path, data["categories"])
    label_of = {cid: i for i, cid in enumerate(category_ids)}

    entries = data["images"][:limit]
    by_id: dict[int, dict] = {}
    stems: dict[str, str] = {}
    for number, entry in enumerate(entries):
        try:
            coco_id, file_name = int(entry["id"]), str(entry["file_name"])
            width, height = int(entry["width"]), int(entry["height"])
        except (KeyError, TypeError, ValueError) as exc:
            raise COCOFormatError(f"{path}: images[{number}] needs 'id', 'file_name', 'width' and 'height' ({exc!r})") from None
        stem = PurePosixPath(file_name).stem
        if stem in stems:
            raise COCOFormatError(f"{path}: images {stems[stem]!r} and {file_name!r} have the same name stem {stem!r}: "
                                  "image ids must be unique (rename one)")
        stems[stem] = file_name
        if coco_id in by_id:
            raise COCOFormatError(f"{path}: image id {coco_id} appears twice")
        by_id[coco_id] = {"stem": stem, "file": file_name, "width": width, "height": height, "anns": [], "error": None}

    known_images = {int(e["id"]) for e in data["images"] if isinstance(e, dict) and "id" in e}
    coco_ids = {PurePosixPath(str(e["file_name"])).stem: int(e["id"]) for e in data["images"]
                if isinstance(e, dict) and "id" in e and "file_name" in e}
    beyond = tuple(PurePosixPath(str(e["file_name"])).stem for e in data["images"][len(entries):]
                   if isinstance(e, dict) and "file_name" in e)
    for number, ann in enumerate(data.get("annotations") or []):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in known_images:
            raise COCOFormatError(f"{path}: annotation {_ann_name(ann, number)} refers to image_id {image_id!r}, "
                                  "which is not in 'images'")
        if image_id in by_id:  # (not cut off by limit)
            by_id[image_id]["anns"].append((number, ann))

    stats = COCOStats()
    images: list[COCOImage] = []
    bad: list[COCOFormatError] = []
    for coco_id, info in by_id.items():
        try:
            image = _image(path, images_dir, coco_id, info, label_of, category_ids, stats)
        except COCOFormatError as exc:
            exc.image_id = info["stem"]
            if not skip_bad:
                raise
            bad.append(exc)
            continue
        images.append(image)
    return COCODataset(path, images, classes, category_ids, stats, bad, coco_ids, beyond)


def _ann_name(ann: object, number: int) -> str:
    if isinstance(ann, dict) and "id" in ann:
        return f"id {ann['id']}"
    return f"#{number}"


def _image(
    path: Path, images_dir: Path, coco_id: int, info: dict, label_of: dict[int, int], category_ids: tuple[int, ...],
    stats: COCOStats,
) -> COCOImage:
    width, height = info["width"], info["height"]
    where = f"{path}: image {info['file']!r} (id {coco_id})"
    if width <= 0 or height <= 0:
        raise COCOFormatError(f"{where}: size {width}x{height} is not positive")
    file = images_dir / info["file"]
    if not file.is_file():
        raise COCOFormatError(f"{where}: image file not found: {file}")
    raw, labels, crowd, ann_ids = [], [], [], []
    for number, ann in info["anns"]:
        name = f"{path}: annotation {_ann_name(ann, number)} of image {info['file']!r}"
        category = ann.get("category_id")
        if category not in label_of:
            raise COCOFormatError(f"{name}: unknown category_id {category!r} (categories: {list(category_ids)})")
        try:
            box = [float(v) for v in ann["bbox"]]
            if len(box) != 4:
                raise ValueError(f"{len(box)} numbers")
        except (KeyError, TypeError, ValueError) as exc:
            raise COCOFormatError(f"{name}: bbox must be [x, y, w, h] ({exc})") from None
        if not all(np.isfinite(box)) or box[2] < 0 or box[3] < 0:
            raise COCOFormatError(f"{name}: bbox {box} has a negative or non-finite size")
        raw.append(box)
        labels.append(label_of[category])
        crowd.append(bool(ann.get("iscrowd", 0)))
        ann_ids.append(ann.get("id", number))
    xywh = np.asarray(raw, dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # COCO [x, y, w, h] -> 0-based xyxy
    limits = np.array([width, height, width, height], dtype=np.float64)
    clipped_boxes = np.clip(xyxy, 0, limits)
    changed = (clipped_boxes != xyxy).any(axis=1)  # [K]
    keep = (clipped_boxes[:, 2] > clipped_boxes[:, 0]) & (clipped_boxes[:, 3] > clipped_boxes[:, 1])
    _count(stats, "clipped", changed & keep, ann_ids)
    _count(stats, "dropped", ~keep, ann_ids)
    if not keep.any():
        stats.empty_images += 1
    arrays = (
        clipped_boxes[keep].astype(np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64)[keep],
        np.asarray(crowd, dtype=bool)[keep],
    )
    for array in arrays:
        array.flags.writeable = False
    return COCOImage(info["stem"], file, width, height, *arrays, coco_id=coco_id)


def _count(stats: COCOStats, kind: str, mask: np.ndarray, ann_ids: list) -> None:
    hits = np.flatnonzero(mask)
    setattr(stats, kind, getattr(stats, kind) + len(hits))
    stats.examples[kind] += [ann_ids[i] for i in hits[: max(0, 5 - len(stats.examples[kind]))]]

