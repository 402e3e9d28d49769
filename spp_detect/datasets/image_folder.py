"""Image-folder datasets (``<root>/<class>/<image>.jpg``), e.g. Caltech101.

Classes are the sub-folder names in sorted order (Caltech101's ``101_ObjectCategories``
has 102 of them, one being ``BACKGROUND_Google``). The paper's protocol (SPP-net 3.3):
per class, 30 random training images and up to 50 of the rest for testing, repeated
over random splits; :func:`split_per_class` draws one such split from a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "FolderImage", "read_image_folder", "split_per_class"]

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
