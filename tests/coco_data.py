"""COCO datasets made from voc2007-mini for the tests, by their own conversion code.

The VOC XML is parsed here with ElementTree, independently of ``spp_detect.datasets.voc``,
and written as COCO json: ``bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``
(VOC's 1-based inclusive pixels to COCO's continuous 0-based ``[x, y, w, h]``), difficult
objects as ``iscrowd``.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

VOC_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
             "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

#: The 3-class relabelling: VOC class -> new category id (ids not 1..3 on purpose).
THREE_CLASSES = {"animal": 7, "vehicle": 3, "person": 12}
RELABEL = {**{n: "animal" for n in ("bird", "cat", "cow", "dog", "horse", "sheep")},
           **{n: "vehicle" for n in ("aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train")},
           "person": "person"}


def voc_objects(voc_root: Path, image_id: str) -> tuple[int, int, list[tuple[str, list[float], bool]]]:
    """``(width, height, [(name, [xmin, ymin, xmax, ymax] 1-based, difficult)])`` of one XML."""
    root = ET.parse(voc_root / "VOC2007" / "Annotations" / f"{image_id}.xml").getroot()
    objects = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        box = [float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((obj.find("name").text.strip(), box, obj.find("difficult").text.strip() == "1"))
    return int(root.find("size/width").text), int(root.find("size/height").text), objects


def image_list(voc_root: Path, image_set: str) -> list[str]:
    return (voc_root / "VOC2007" / "ImageSets" / "Main" / f"{image_set}.txt").read_text().split()


def write_coco(voc_root: Path, image_ids: list[str], path: Path, relabel: dict[str, str] | None = None,
               categories: dict[str, int] | None = None, first_id: int = 100) -> Path:
    """COCO json of ``image_ids`` (image ids ``first_id``, ``first_id + 1``, ...: not the VOC
    numbers). Without ``relabel``: the 20 VOC classes, category ids 1..20. With it: each VOC
    name mapped to a new name (objects of unmapped names left out), ``categories`` name -> id."""
    if categories is None:
        categories = {name: i + 1 for i, name in enumerate(VOC_NAMES)}
    images, annotations = [], []
    for number, image_id in enumerate(image_ids, start=first_id):
        width, height, objects = voc_objects(voc_root, image_id)
        images.append({"id": number, "file_name": f"{image_id}.jpg", "width": width, "height": height})
        for name, (x1, y1, x2, y2), difficult in objects:
            name = relabel.get(name) if relabel is not None else name
            if name is None:
                continue
            annotations.append({"id": 1000 + len(annotations), "image_id": number, "category_id": categories[name],
                                "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], "area": (x2 - x1 + 1) * (y2 - y1 + 1),
                                "iscrowd": int(difficult)})
    cats = [{"id": cid, "name": name} for name, cid in categories.items()]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return path
