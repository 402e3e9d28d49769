"""How a dataset names its images and classes in COCO results files.

Inside the code an image is its id string (a file name's stem, ``"000001"``) and a class
its index into the dataset's class list. A COCO dataset json names them otherwise: each
image by its ``images[].id`` and each class by its ``categories[].id`` (any integers, not
necessarily from 1 or contiguous). A results file (``detections.json``) must use the
json's own ids to load with ``pycocotools.COCO.loadRes`` against that json, or with any
other COCO tool. :class:`ResultIds` holds both mappings; it is made once, where the json
is read (:func:`spp_detect.datasets.registry.open_dataset`), travels beside the data
(``extract`` records it in ``<cache>/result_ids.json``, ``detect``, ``combine`` and
``predict`` in their ``detections_info.json``) and is applied where results are written or read
(:mod:`eval.results`), the one place ids are converted.

VOC and plain images have no such ids: their results keep the file stem as ``image_id``
and ``1 + class index`` as ``category_id``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ResultIds", "RESULT_IDS_FILE", "record_result_ids", "read_result_ids"]

#: The file beside an extract cache's images that records the dataset's ids.
RESULT_IDS_FILE = "result_ids.json"


@dataclass(frozen=True)
class ResultIds:
    """The ids a COCO dataset json gives its images and classes.

    Attributes:
        images: image id string (file stem) -> the json's ``images[].id``.
        category_ids: ``categories[].id`` of each class, in class-index order (the
            class list is the categories sorted by id, so this is ascending).
        source: the json the ids come from (for messages).
    """

    images: Mapping[str, int]
    category_ids: tuple[int, ...]
    source: str = ""
    _stems: dict[int, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", {str(k): int(v) for k, v in self.images.items()})
        object.__setattr__(self, "category_ids", tuple(int(c) for c in self.category_ids))
        object.__setattr__(self, "_stems", {v: k for k, v in self.images.items()})

    def image_id(self, stem: str) -> int:
        """The json's id of the image ``stem``.

        Raises:
            KeyError: an image the json does not list.
        """
        try:
            return self.images[stem]
        except KeyError:
            raise KeyError(f"image {stem!r} is not in {self.source or 'the dataset json'}") from None

    def stem(self, coco_id: int) -> str:
        """The image id string of the json's image ``coco_id``.

        Raises:
            KeyError: an id the json's images do not have.
        """
        try:
            return self._stems[int(coco_id)]
        except KeyError:
            raise KeyError(f"image_id {coco_id} is not an image id of {self.source or 'the dataset json'}") from None

    def label(self, category_id: int) -> int:
        """The class index of the json's category ``category_id``.

        Raises:
            KeyError: not one of :attr:`category_ids`.
        """
        try:
            return self.category_ids.index(int(category_id))
        except ValueError:
            raise KeyError(f"category_id {category_id} is not a category of {self.source or 'the dataset json'} "
                           f"(ids {list(self.category_ids)})") from None

    def merged(self, other: ResultIds) -> ResultIds:
        """These ids and ``other``'s images (the same categories: one dataset read twice,
        e.g. with ``--limit`` and then whole).

        Raises:
            ValueError: other categories, or an image with another id.
        """
        if other.category_ids != self.category_ids:
            raise ValueError(f"category ids {list(other.category_ids)} of {other.source} differ from "
                             f"{list(self.category_ids)} of {self.source}")
        clash = sorted(s for s, i in other.images.items() if self.images.get(s, i) != i)
        if clash:
            raise ValueError(f"{other.source} gives image(s) {clash[:5]} other ids than {self.source}")
        return ResultIds({**self.images, **other.images}, self.category_ids, other.source or self.source)

    def to_json(self) -> dict:
        """``{"source", "category_ids", "images"}``, as :meth:`from_json` reads it."""
        return {"source": self.source, "category_ids": list(self.category_ids), "images": dict(sorted(self.images.items()))}

    @classmethod
    def from_json(cls, data: Mapping) -> ResultIds:
        """Inverse of :meth:`to_json`."""
        return cls(data["images"], tuple(data["category_ids"]), str(data.get("source", "")))

    @classmethod
    def of_coco(cls, images: Sequence, category_ids: Sequence[int], source: Path | str) -> ResultIds:
        """The ids of COCO images (objects with ``image_id`` and ``coco_id``) and categories."""
        return cls({im.image_id: im.coco_id for im in images}, tuple(category_ids), str(source))


def record_result_ids(folder: Path | str, ids: ResultIds) -> None:
    """Add ``ids`` to ``<folder>/result_ids.json``, atomically: merged with what an earlier
    run of the same dataset recorded (e.g. with ``--limit``), replacing another dataset's
    (other categories or image ids: a folder refilled with ``--force``). Like
    ``images.json``, not part of the folder's key: it says how results of these images
    are named, not how they are computed."""
    from spp_detect.stage_dir import atomic_write

    path = Path(folder) / RESULT_IDS_FILE
    known = read_result_ids(folder)
    try:
        merged = known.merged(ids) if known is not None else ids
    except ValueError:
        merged = ids
    atomic_write(path, lambda p: p.write_text(json.dumps(merged.to_json(), indent=0)))


def read_result_ids(folder: Path | str) -> ResultIds | None:
    """The ids recorded in ``<folder>/result_ids.json``, or ``None`` (not a COCO dataset's)."""
    path = Path(folder) / RESULT_IDS_FILE
    return ResultIds.from_json(json.loads(path.read_text())) if path.is_file() else None
