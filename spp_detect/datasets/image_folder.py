"""Image-folder datasets: ``<root>/<class>/<image>.jpg`` for classification (e.g.
Caltech101), and plain images without annotations for detection (:func:`read_images`).

Classes are the sub-folder names in sorted order (Caltech101's ``101_ObjectCategories``
has 102 of them, one being ``BACKGROUND_Google``). The paper's protocol (SPP-net 3.3):
per class, 30 random training images and up to 50 of the rest for testing, repeated
over random splits; :func:`split_per_class` draws one such split from a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "FolderImage", "PlainImage", "read_image_folder", "read_images", "split_per_class"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")


@dataclass(frozen=True)
class FolderImage:
    """One image of an image-folder dataset: ``image_id`` is ``<class>/<file stem>``."""

    image_id: str
    path: Path
    label: int


def read_image_folder(root: Path | str) -> tuple[list[FolderImage], tuple[str, ...]]:
    """All images under ``root/<class>/`` (sorted by class, then file name) and the classes.

    Raises:
        FileNotFoundError: ``root`` is not a folder or holds no class folder with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes, images = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            continue
        label = len(classes)
        classes.append(folder.name)
        images += [FolderImage(f"{folder.name}/{f.stem}", f, label) for f in files]
    if not images:
        raise FileNotFoundError(f"{root}: no <class>/<image> files ({', '.join(IMAGE_SUFFIXES)})")
    return images, tuple(classes)


def split_per_class(
    images: Sequence[FolderImage], split: str, train_per_class: int = 30, test_per_class: int = 50, seed: int = 0
) -> list[FolderImage]:
    """One random train/test split per class (paper 3.3: 30 train, up to 50 test per class).

    The same ``seed`` gives complementary ``train`` and ``test`` lists (no image in both).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng(seed)
    chosen = []
    labels = np.array([im.label for im in images])
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = rng.permutation(members)
        part = order[:train_per_class] if split == "train" else order[train_per_class : train_per_class + test_per_class]
        chosen += sorted(part.tolist())
    return [images[i] for i in chosen]


@dataclass(frozen=True)
class PlainImage:
    """An image without annotations, for proposals, extract, detect and predict (the same
    attributes as :class:`~spp_detect.datasets.voc.VOCImage`, with no objects).

    Attributes:
        image_id: the file name's stem.
        path: the image file.
        width, height: the stored size in pixels (read from the file's header).
        boxes: ``np.ndarray[0, 4]`` float32; ``labels`` ``[0]`` int64; ``difficult`` ``[0]`` bool.
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


def read_images(
    sources: Sequence[Path | str], *, limit: int | None = None, bad: list[Exception] | None = None
) -> list[PlainImage]:
    """Images from files and folders (a folder gives its image files, sorted by name; not
    recursive), in the order given.

    Args:
        limit: only the first ``limit`` images.
        bad: if given, an image whose header cannot be read is appended here (an
            :class:`~spp_detect.images.ImageReadError`) and left out instead of raising.

    Raises:
        FileNotFoundError: a source does not exist, or a folder holds no image file.
        ValueError: two images share a file name stem (their image id).
        ImageReadError: a file is not a readable image (unless ``bad`` is given).
    """
    from PIL import Image

    from spp_detect.images import ImageReadError

    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif source.is_file():
            files.append(source)
        else:
            raise FileNotFoundError(f"image or folder not found: {source}")
    files = files[:limit]
    seen: dict[str, Path] = {}
    images = []
    for path in files:
        if path.stem in seen:
            raise ValueError(f"{seen[path.stem]} and {path} have the same name stem {path.stem!r}: image ids must be unique")
        seen[path.stem] = path
        try:
            with Image.open(path) as pil:  # the header only: the pixels are decoded by the stage that reads them
                width, height = pil.size
        except (OSError, SyntaxError, ValueError) as exc:
            error = ImageReadError(path, f"not a readable image ({exc})")
            if bad is None:
                raise error from None
            bad.append(error)
            continue
        images.append(PlainImage(path.stem, path, int(width), int(height)))
    return images
