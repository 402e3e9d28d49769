"""One interface over the detection data sources: a VOC devkit, a COCO json, plain images.

Each source gives a :class:`Dataset`: images with the attributes every stage reads
(``image_id``, ``path``, ``width``, ``height``, and ``boxes [K, 4]`` 0-based xyxy, ``labels
[K]``, ``difficult [K]``, empty for plain images), the **class list** the labels index, and
the name recorded in stage manifests and devkit result files. The class list travels with
the data: ``extract`` stores it in the cache and every later stage reads it from there.

The registry is a dict (:data:`DATASETS`) from a kind to its opener; :func:`open_dataset`
picks the kind from the options a command was given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spp_detect.datasets.result_ids import ResultIds

__all__ = ["Dataset", "DATASETS", "open_dataset", "DatasetError", "class_difference"]


class DatasetError(ValueError):
    """The options name no data source, or two at once, or the source cannot be read."""


@dataclass
class Dataset:
    """Images and their class list, from one source.

    Attributes:
        kind: ``"voc"``, ``"coco"`` or ``"images"`` (a key of :data:`DATASETS`).
        images: ``VOCImage`` / ``COCOImage`` / ``PlainImage`` objects, in the source's order.
        classes: class names the labels index (``()`` for plain images: no labels).
        name: recorded in manifests and devkit result file names (VOC: the image set;
            COCO: the json's stem; plain images: ``"images"``).
        annotated: whether the images carry ground truth (plain images do not).
        notes: what reading changed, one line (COCO: clipped / dropped boxes), or ``""``.
        bad: entries left out (``skip_bad``), each an exception naming its file.
        coco_json: the annotation file of a COCO dataset (for ``evaluate --coco``).
        year: the VOC year (VOC only).
        result_ids: the json's image and category ids (COCO only; results files are
            written in them, :mod:`spp_detect.datasets.result_ids`), else ``None``.
        beyond_limit: ids of the source's images after the first ``limit`` (not read), so
            that detections of those images can be told from detections of unknown ones.
        image_folder: where the image files are looked for, for messages (a COCO
            dataset's ``--images`` folder, a VOC year's ``JPEGImages``, plain images' sources).
    """

    kind: str
    images: list
    classes: tuple[str, ...]
    name: str
    annotated: bool = True
    notes: str = ""
    bad: list[Exception] = field(default_factory=list)
    coco_json: Path | None = None
    year: str | None = None
    result_ids: ResultIds | None = None
    beyond_limit: tuple[str, ...] = ()
    image_folder: str = ""

    def manifest_identity(self) -> dict[str, str]:
        """What identifies the images in a stage manifest: ``{"year", "image_set"}`` for VOC
        (as before other sources existed), ``{"dataset", "image_set"}`` otherwise."""
        if self.kind == "voc":
            return {"year": str(self.year), "image_set": self.name}
        return {"dataset": self.kind, "image_set": self.name}


def _open_voc(voc_root: Path | str, image_set: str = "test", year: str | int = 2007, *, limit: int | None = None,
              skip_bad: bool = False) -> Dataset:
    from spp_detect.datasets.voc import VOC_CLASSES, read_voc, voc_year_dir

    bad: list | None = [] if skip_bad else None
    images = read_voc(voc_root, image_set, year, bad=bad, limit=limit)
    year_dir = voc_year_dir(voc_root, year)
    listed = (year_dir / "ImageSets" / "Main" / f"{image_set}.txt").read_text().split("\n")
    beyond = tuple(line.split()[0] for line in listed if line.strip())[limit:] if limit is not None else ()
    return Dataset("voc", images, VOC_CLASSES, image_set, bad=bad or [], year=str(year), beyond_limit=beyond,
                   image_folder=str(year_dir / "JPEGImages"))


def _open_coco(coco_json: Path | str, images_dir: Path | str, *, limit: int | None = None,
               skip_bad: bool = False) -> Dataset:
    from spp_detect.datasets.coco import read_coco

    data = read_coco(coco_json, images_dir, limit=limit, skip_bad=skip_bad)
    stats = data.stats
    notes = stats.describe() if stats.clipped or stats.dropped or stats.empty_images else ""
    return Dataset("coco", data.images, data.classes, Path(coco_json).stem, notes=notes, bad=list(data.bad),
                   coco_json=Path(coco_json), result_ids=ResultIds(data.coco_ids, data.category_ids, str(coco_json)),
                   beyond_limit=data.beyond_limit, image_folder=str(images_dir))


def _open_images(sources: Sequence[Path | str], *, limit: int | None = None, skip_bad: bool = False) -> Dataset:
    from spp_detect.datasets.image_folder import read_images

    bad: list | None = [] if skip_bad else None
    images = read_images(sources, limit=limit, bad=bad)
    return Dataset("images", images, (), "images", annotated=False, bad=bad or [],
                   image_folder=", ".join(str(s) for s in sources))


#: kind -> opener; each returns a :class:`Dataset`.
DATASETS: dict[str, Callable[..., Dataset]] = {"voc": _open_voc, "coco": _open_coco, "images": _open_images}


def open_dataset(
    *,
    voc_root: Path | str | None = None,
    image_set: str = "test",
    year: str | int = 2007,
    coco_json: Path | str | None = None,
    images: Sequence[Path | str] = (),
    limit: int | None = None,
    skip_bad: bool = False,
) -> Dataset:
    """The dataset a command's options name.

    * ``voc_root`` (with ``image_set``, ``year``): a VOC devkit;
    * ``coco_json`` with ``images`` (one folder, the one ``file_name`` is relative to): COCO;
    * ``images`` alone (folders and/or files): plain images without annotations.

    Raises:
        DatasetError: no source, or more than one.
        VOCFormatError, COCOFormatError, ImageReadError, FileNotFoundError: from the
            readers; each message names its file.
    """
    images = [Path(p) for p in images]
    if voc_root is not None and (coco_json is not None or images):
        raise DatasetError("give either --voc-root, or --coco-json with --images, or --images alone; not several")
    if coco_json is not None:
        if len(images) != 1 or not images[0].is_dir():
            raise DatasetError("--coco-json needs --images DIR: the one folder its file_name entries are relative to")
        return DATASETS["coco"](coco_json, images[0], limit=limit, skip_bad=skip_bad)
    if images:
        return DATASETS["images"](images, limit=limit, skip_bad=skip_bad)
    if voc_root is not None:
        return DATASETS["voc"](voc_root, image_set, year, limit=limit, skip_bad=skip_bad)
    raise DatasetError("no images: give --voc-root, --coco-json FILE --images DIR, or --images FOLDER_OR_FILES")


def class_difference(expected: Sequence[str], got: Sequence[str]) -> str | None:
    """How class list ``got`` differs from ``expected`` in words (``"missing ['dog'], extra
    ['cat']"``, or ``"same classes in another order"``), or ``None`` if they are equal."""
    if tuple(expected) == tuple(got):
        return None
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    return f"missing {missing}, extra {extra}" if missing or extra else "same classes in another order"
