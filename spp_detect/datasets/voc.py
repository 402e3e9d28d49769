"""PASCAL VOC reader for the standard VOCdevkit layout.

``<voc_root>/VOC<year>/{JPEGImages,Annotations,ImageSets/Main/<image_set>.txt}``.
Boxes are converted once, here, from VOC's 1-based inclusive pixels to the project's
0-based continuous xyxy convention (see :mod:`spp_detect.boxes`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from spp_detect.boxes import from_voc_1based

__all__ = ["VOC_CLASSES", "VOCFormatError", "VOCImage", "read_voc", "voc_year_dir"]

#: The 20 PASCAL VOC classes in the devkit's order (VOCinit.m). Labels are indices into it.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
_CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}


class VOCFormatError(ValueError):
    """A VOC file is missing or malformed; the message names the file. ``image_id`` is the
    image the entry belongs to (``None`` for the image-set list itself)."""

    image_id: str | None = None


@dataclass(frozen=True)
class VOCImage:
    """One annotated VOC image.

    Attributes:
        image_id: e.g. ``"000001"``.
        path: the JPEG file.
        width, height: image size in pixels (from the XML ``<size>``).
        boxes: ``np.ndarray[K, 4]`` float32, 0-based continuous xyxy in image pixels.
        labels: ``np.ndarray[K]`` int64, indices into :data:`VOC_CLASSES`.
        difficult: ``np.ndarray[K]`` bool, the devkit's ``difficult`` flags.
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def voc_year_dir(voc_root: Path | str, year: str | int = 2007) -> Path:
    """``<voc_root>/VOC<year>``, accepting a root that already is that folder."""
    root = Path(voc_root)
    if root.name == f"VOC{year}":
        return root
    return root / f"VOC{year}"


def read_voc(
    voc_root: Path | str,
    image_set: str,
    year: str | int = 2007,
    *,
    bad: list[VOCFormatError] | None = None,
    limit: int | None = None,
) -> list[VOCImage]:
    """Read every image of ``ImageSets/Main/<image_set>.txt``, in list order.

    Args:
        limit: only the first ``limit`` entries of the list.
        bad: if given, an entry with a missing or malformed annotation or a missing image
            file is appended here (its ``image_id`` set) and left out, instead of raising
            (``--skip-bad``). A missing list still raises.

    Raises:
        VOCFormatError: a missing list, annotation or image file, bad XML, an unknown
            class name, or a box that is inverted, of zero area or outside the image; the
            message names the offending file.
    """
    year_dir = voc_year_dir(voc_root, year)
    list_file = year_dir / "ImageSets" / "Main" / f"{image_set}.txt"
    if not list_file.is_file():
        raise VOCFormatError(f"image-set list not found: {list_file}")
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()][:limit]
    images = []
    for image_id in ids:
        xml_path = year_dir / "Annotations" / f"{image_id}.xml"
        try:
            image = _read_annotation(str(xml_path), str(year_dir / "JPEGImages" / f"{image_id}.jpg"))
        except VOCFormatError as exc:
            exc.image_id = image_id
            if bad is None:
                raise
            bad.append(exc)
            continue
        images.append(image)
    return images


def _read_annotation(xml_path: str, image_path: str) -> VOCImage:
    if not Path(xml_path).is_file():
        raise VOCFormatError(f"annotation file not found: {xml_path} (listed in the image set)")
    if not Path(image_path).is_file():
        raise VOCFormatError(f"image file not found: {image_path} (listed in the image set)")
    stat = Path(xml_path).stat()
    return _parse_annotation(xml_path, image_path, stat.st_mtime_ns, stat.st_size)


def _check_box(xml_path: str, number: int, name: str, box: list[float], width: int, height: int) -> None:
    """VOC boxes are 1-based inclusive: ``1 <= xmin <= xmax <= width`` (``xmin == xmax`` is
    one pixel wide; ``xmax == xmin - 1`` is zero wide)."""
    xmin, ymin, xmax, ymax = box
    where = f"{xml_path}: object {number} ({name}) box {xmin:g},{ymin:g},{xmax:g},{ymax:g}"
    if not all(np.isfinite(box)):
        raise VOCFormatError(f"{where} is not finite")
    if xmax == xmin - 1 or ymax == ymin - 1:
        raise VOCFormatError(f"{where} has zero area")
    if xmax < xmin or ymax < ymin:
        raise VOCFormatError(f"{where} is inverted (xmax < xmin or ymax < ymin)")
    if xmin < 1 or ymin < 1 or xmax > width or ymax > height:
        raise VOCFormatError(f"{where} lies outside the {width}x{height} image (1-based pixels 1..{width}, 1..{height})")


@lru_cache(maxsize=None)
def _parse_annotation(xml_path: str, image_path: str, mtime_ns: int, size: int) -> VOCImage:
    # Cached in memory only, keyed by path and file stamp (never an unkeyed pickle).
    try:
        root = ET.parse(xml_path).getroot()
        width = int(root.findtext("size/width"))
        height = int(root.findtext("size/height"))
        if width <= 0 or height <= 0:
            raise VOCFormatError(f"{xml_path}: image size {width}x{height} is not positive")
        boxes, labels, difficult = [], [], []
        for number, obj in enumerate(root.iter("object"), start=1):
            name = obj.findtext("name").strip()
            if name not in _CLASS_INDEX:
                raise VOCFormatError(f"{xml_path}: unknown class name {name!r}")
            bb = obj.find("bndbox")
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            _check_box(xml_path, number, name, box, width, height)
            boxes.append(box)
            labels.append(_CLASS_INDEX[name])
            difficult.append(int(obj.findtext("difficult", default="0")) == 1)
    except VOCFormatError:
        raise
    except (ET.ParseError, TypeError, ValueError, AttributeError) as exc:
        raise VOCFormatError(f"{xml_path}: malformed VOC annotation ({exc})") from exc
    arrays = (
        from_voc_1based(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
        np.asarray(labels, dtype=np.int64),
        np.asarray(difficult, dtype=bool),
    )
    for array in arrays:  # shared through the cache: read-only
        array.flags.writeable = False
    return VOCImage(Path(xml_path).stem, Path(image_path), width, height, *arrays)
