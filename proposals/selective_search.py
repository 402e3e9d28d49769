"""Selective search windows for one image, ranked as the paper ranks them.

Two pure functions:

* :func:`selective_search` runs Uijlings et al.'s hierarchical grouping
  (:mod:`proposals.grouping`, on OpenCV's Felzenszwalb segmentation) for every colour
  space x ``k`` x strategy of a mode and returns every box, best first (below);
* :func:`filter_boxes` applies R-CNN's post-processing: clip to the image, drop boxes
  narrower or shorter than ``min_size`` pixels, drop exact duplicates (first occurrence
  wins), cap at ``max_boxes``; :func:`propose` scales ``min_size`` down for images
  smaller than VOC's (:func:`scaled_min_size`).

Boxes are ``np.ndarray[N, 4]`` float32 in the project's one convention (0-based continuous
``(x1, y1, x2, y2)`` image pixels, see :mod:`spp_detect.boxes`).

"Best first" is the paper's order (docs/sources.md 1.11: Uijlings' ``Image2HierarchicalGrouping.m``,
R-CNN's ``selective_search_boxes.m``, IJCV 2013 section 5): in every hierarchy the
initial segments and the merged regions get priorities ``N .. 1`` in that order (the last
merge, the whole image, gets 1); each priority is multiplied by a uniform random number
and all boxes of the image are sorted ascending. Regions high in a hierarchy tend to come
first, so the first K boxes of a file are a sensible K-box budget. (OpenCV's own
``process()`` ranks by ``rand() * level`` with level 1 for the initial segments, which its
source calls "inverted from the paper" and which puts the smallest segments first; it is
not used.) The random numbers come from ``np.random.default_rng(seed)``, made afresh for
every image, so the order is a function of the image and the seed alone.

Modes (one engine, three parameter sets):

* ``fast`` (the default): selective search's "fast mode" as the SPP-net paper (4.1) and
  R-CNN use it (``selective_search_boxes.m``, docs/sources.md 1.11): HSV + Lab, k = 50 and 100 with
  segment min size = k, sigma 0.8, strategies {colour+texture+size+fill,
  texture+size+fill}. Our histograms and segmentation are not bit-identical to Uijlings'
  MATLAB/mex code, so its boxes are not the precomputed VOC07 boxes (which nobody can
  reproduce: fast-rcnn#26, #41); see ``bench/results/proposals-fast.json`` for recall.
* ``opencv-fast``: the parameter set of OpenCV's ``switchToSelectiveSearchFast`` (which is
  *not* the paper's fast mode): HSV + Lab, k = 150, 300, 450, segment min size 100
  (``createGraphSegmentation``'s default), sigma 0.8, the same two strategies.
* ``opencv-quality``: the parameter set of OpenCV's ``switchToSelectiveSearchQuality``:
  HSV, Lab, grey, hue and rgI images, k = 150 .. 750 in steps of 150, min size 100,
  strategies {colour+texture+size+fill, texture+size+fill, fill, size} (several times
  slower).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from proposals.grouping import (
    colour_bin_image,
    hierarchical_grouping,
    hierarchy_boxes,
    hierarchy_priorities,
    rank_hierarchy_boxes,
    region_features,
    segment,
    texture_bin_image,
)
from spp_detect.boxes import clip_boxes, remove_small_boxes

__all__ = ["ENGINE", "MODES", "R_CNN_MIN_SIZE", "R_CNN_MAX_BOXES", "VOC_LONGER_SIDE", "FASTER_RCNN_MIN_SIZE",
           "selective_search", "filter_boxes", "scaled_min_size", "propose"]

#: R-CNN ``selective_search_boxes.m``: ``FilterBoxesWidth(boxes, 20)`` keeps boxes whose
#: (inclusive) width and height are both at least 20 pixels.
R_CNN_MIN_SIZE = 20
#: The longer side, in pixels, of the images R-CNN's minimum was chosen for: PASCAL VOC
#: distributes its images with the longer side at 500 px (392 of voc2007-mini's 400
#: images; the other 8 are smaller).
VOC_LONGER_SIDE = 500
#: The smallest proposal side Faster R-CNN keeps, in original-image pixels (py-faster-rcnn
#: ``config.py``: ``RPN_MIN_SIZE = 16``, applied as ``16 * im_scale`` in the scaled frame
#: by ``proposal_layer.py``): the floor of the scaled minimum below.
FASTER_RCNN_MIN_SIZE = 16
#: R-CNN and SPP-net score "about 2,000" selective-search windows per image (fast mode).
R_CNN_MAX_BOXES = 2000
#: Names the box-making code in a proposals folder's manifest, so that a folder made by
#: an earlier engine (OpenCV's ``process()`` in OpenCV's order) is not resumed with this one.
ENGINE = "grouping-v1: Uijlings hierarchical grouping, ranked priority x rand ascending"


@dataclass(frozen=True)
class _ModeSpec:
    colour_spaces: tuple[str, ...]
    ks: tuple[int, ...]
    min_sizes: tuple[int, ...]
    sigma: float
    strategies: tuple[str, ...]


_TWO_STRATEGIES = ("colour+texture+size+fill", "texture+size+fill")
_MODE_SPECS: dict[str, _ModeSpec] = {
    # R-CNN selective_search_boxes.m, fast mode: colorTypes {'Hsv', 'Lab'},
    # simFunctionHandles {ColourTextureSizeFill, TextureSizeFill}, ks [50 100],
    # minSize = k, sigma 0.8 (docs/sources.md 1.11).
    "fast": _ModeSpec(("hsv", "lab"), (50, 100), (50, 100), 0.8, _TWO_STRATEGIES),
    # OpenCV selectivesearchsegmentation.cpp switchToSelectiveSearchFast(base_k=150,
    # inc_k=150, sigma=0.8): k = base_k + i * inc_k, i = 0..2; createGraphSegmentation's
    # default min_size 100.
    "opencv-fast": _ModeSpec(("hsv", "lab"), (150, 300, 450), (100, 100, 100), 0.8, _TWO_STRATEGIES),
    # switchToSelectiveSearchQuality: i = 0..4, five images, four strategies.
    "opencv-quality": _ModeSpec(
        ("hsv", "lab", "grey", "hue", "rgi"),
        (150, 300, 450, 600, 750),
        (100,) * 5,
        0.8,
        (*_TWO_STRATEGIES, "fill", "size"),
    ),
}
MODES: tuple[str, ...] = tuple(_MODE_SPECS)


def selective_search(image_bgr: np.ndarray, mode: str = "fast", *, seed: int = 0) -> np.ndarray:
    """Selective search boxes of one image, best first (the paper's order), unfiltered.

    Args:
        image_bgr: ``np.ndarray[H, W, 3]`` uint8, BGR (as ``cv2.imread`` returns), at the
            resolution the boxes should live in (R-CNN and SPP-net used the original).
        mode: ``"fast"``, ``"opencv-fast"`` or ``"opencv-quality"`` (see the module docstring).
        seed: seed of the ``np.random.default_rng`` that draws the ranking's random factors.

    Returns:
        ``np.ndarray[N, 4]`` float32, 0-based continuous ``(x1, y1, x2, y2)`` image pixels,
        ``0 <= x1 < x2 <= W``, ``0 <= y1 < y2 <= H``, every hierarchy's boxes (duplicates
        included) ranked best first; a region whose pixels span columns ``a .. b`` has
        ``x1 = a, x2 = b + 1``.

    Raises:
        ValueError: the image is not a non-empty ``[H, W, 3]`` uint8 array, or ``mode`` is
            unknown.
    """
    if not isinstance(image_bgr, np.ndarray) or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        shape = getattr(image_bgr, "shape", type(image_bgr).__name__)
        raise ValueError(f"selective_search: expected a BGR image [H, W, 3], got {shape}")
    if image_bgr.dtype != np.uint8 or image_bgr.shape[0] == 0 or image_bgr.shape[1] == 0:
        raise ValueError(f"selective_search: expected a non-empty uint8 image, got {image_bgr.dtype} {image_bgr.shape}")
    if mode not in MODES:
        raise ValueError(f"selective_search: unknown mode {mode!r}; choose from {list(MODES)}")
    spec = _MODE_SPECS[mode]
    image_bgr = np.ascontiguousarray(image_bgr)
    boxes, priorities = [], []
    for space in spec.colour_spaces:
        image, ranges = _colour_space(image_bgr, space)
        colour_bins, texture_bins = colour_bin_image(image, ranges), texture_bin_image(image)
        for k, min_size in zip(spec.ks, spec.min_sizes):
            features = region_features(segment(image, spec.sigma, k, min_size), colour_bins, texture_bins)
            for strategy in spec.strategies:
                _, bounds = hierarchical_grouping(features, strategy)
                boxes.append(hierarchy_boxes(bounds))  # [initial; merged]
                priorities.append(hierarchy_priorities(len(bounds)))
    return rank_hierarchy_boxes(boxes, priorities, np.random.default_rng(seed))


def _colour_space(image_bgr: np.ndarray, space: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(image [H, W, C] uint8, values per channel)``: OpenCV's 8-bit conversions (hue is 0..179)."""
    import cv2

    if space in ("hsv", "hue"):
        hsv = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2HSV)
        return (hsv, (180, 256, 256)) if space == "hsv" else (np.ascontiguousarray(hsv[:, :, :1]), (180,))
    if space == "lab":
        return cv2.cvtColor(image_bgr, cv2.COLOR_BGR2Lab), (256, 256, 256)
    grey = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
    if space == "grey":
        return grey[:, :, None], (256,)
    # rgI as OpenCV's switchToSelectiveSearchQuality builds it: normalised r and g, intensity.
    rgb_sum = image_bgr.astype(np.float32).sum(axis=2)  # [H, W]
    safe = np.where(rgb_sum > 0, rgb_sum, 1.0)
    r = np.clip(image_bgr[:, :, 2] * 255.0 / safe, 0, 255).astype(np.uint8)
    g = np.clip(image_bgr[:, :, 1] * 255.0 / safe, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.stack([r, g, grey], axis=2)), (256, 256, 256)


def filter_boxes(
    boxes: np.ndarray,
    width: int,
    height: int,
    min_size: float = R_CNN_MIN_SIZE,
    max_boxes: int | None = R_CNN_MAX_BOXES,
) -> np.ndarray:
    """R-CNN's post-processing of selective search boxes, order preserving.

    In this order: clip to ``[0, width] x [0, height]``; drop boxes with width or height
    below ``min_size`` (R-CNN ``FilterBoxesWidth(boxes, 20)``: an inclusive width
    ``x2 - x1 + 1 >= 20`` in MATLAB is a continuous width ``>= 20`` here); drop exact
    duplicates, keeping the first occurrence; keep the first ``max_boxes``.

    Args:
        boxes: ``np.ndarray[N, 4]``, 0-based continuous xyxy image pixels, ranked.
        width, height: image size in pixels.
        min_size: smallest kept width and height in pixels (0 keeps every box).
        max_boxes: cap on the number of boxes; ``None`` for no cap.

    Returns:
        ``np.ndarray[K, 4]`` float32, ``K <= min(N, max_boxes)``, the kept boxes in their
        original relative order; ``[0, 4]`` when nothing is left.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if width <= 0 or height <= 0:
        raise ValueError(f"filter_boxes: image size must be positive, got {width}x{height}")
    if max_boxes is not None and max_boxes < 0:
        raise ValueError(f"filter_boxes: max_boxes must be >= 0 or None, got {max_boxes}")
    clipped = clip_boxes(torch.from_numpy(boxes), int(width), int(height))
    boxes = clipped[remove_small_boxes(clipped, min_size)].numpy()
    _, first = np.unique(boxes, axis=0, return_index=True)  # first occurrence of each row
    boxes = boxes[np.sort(first)]
    if max_boxes is not None:
        boxes = boxes[:max_boxes]
    return np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)


def scaled_min_size(min_size: float, width: int, height: int, reference: int | None = VOC_LONGER_SIDE,
                    floor: float = FASTER_RCNN_MIN_SIZE) -> float:
    """R-CNN's smallest kept box side, in pixels of a ``width x height`` image, scaled down
    for an image smaller than the images it was chosen for.

    R-CNN's rule (``selective_search_boxes.m``: ``FilterBoxesWidth(boxes, 20)``) was set
    for PASCAL VOC, whose images have their longer side at 500 px: 20 px is 4% of it. A
    smaller image holds the same scene in fewer pixels, so its objects are smaller in
    pixels, and a fixed 20 px drops windows that would cover them: a square object of side
    ``s`` can only be hit at IoU 0.5 by a box of side at most ``s * sqrt(2)``, so objects
    under ``min_size / sqrt(2)`` px are out of reach (on 400 x 226 photos 54 of 71 objects
    under 20 px had no box at IoU 0.5; issue 31). The minimum is therefore kept at the
    same fraction of the image, ``min_size * longer side / reference``, but not below
    Faster R-CNN's 16 px (``floor``; below it a box holds too few pixels to classify, and
    a thumbnail-size image keeps no box at all, as with R-CNN's rule), and never above
    ``min_size`` (a larger image keeps R-CNN's rule). VOC-size images (longer side ``>=
    reference``) get exactly ``min_size``, so their boxes are R-CNN's.

    Args:
        min_size: R-CNN's minimum for an image whose longer side is ``reference`` px.
        width, height: the image's size in pixels.
        reference: the longer side ``min_size`` is meant for (VOC: 500); ``None`` or 0:
            ``min_size`` as it is on every image (R-CNN's fixed rule).
        floor: the scaled minimum's lower bound (it never raises ``min_size`` itself).

    Returns:
        ``min(min_size, max(floor, min_size * max(width, height) / reference))``; e.g.
        16.0 for a 400 x 300 image, 18.0 for 450 x 300, 20.0 for VOC's 500 x 375.
    """
    if not reference:
        return float(min_size)
    scaled = float(min_size) * max(int(width), int(height)) / float(reference)
    return min(float(min_size), max(float(floor), scaled))


def propose(
    image_bgr: np.ndarray,
    mode: str = "fast",
    min_size: float = R_CNN_MIN_SIZE,
    max_boxes: int | None = R_CNN_MAX_BOXES,
    seed: int = 0,
    max_pixels: int | None = None,
    min_size_reference: int | None = None,
) -> np.ndarray:
    """:func:`selective_search` then :func:`filter_boxes` on the image's own size.

    Args:
        min_size: smallest kept box side in pixels; with ``min_size_reference``, for an
            image of that longer side, scaled down for smaller ones (:func:`scaled_min_size`).
        max_pixels: an image with more pixels is searched on a copy shrunk (``INTER_AREA``)
            to at most this many, which bounds time and memory (both grow with the pixel
            count: per-pixel histogram bins, Felzenszwalb's graph); its boxes are scaled
            back to the original pixels before filtering. ``None``: always the original (VOC images are <= 0.25 MP).
        min_size_reference: see :func:`scaled_min_size`; ``None``: ``min_size`` as it is.

    Returns:
        ``np.ndarray[K, 4]`` float32, 0-based continuous xyxy image pixels, ranked.
    """
    import cv2

    height, width = image_bgr.shape[:2]
    searched = image_bgr
    if max_pixels is not None and width * height > max_pixels:
        factor = (max_pixels / (width * height)) ** 0.5
        size = (max(1, int(width * factor)), max(1, int(height * factor)))
        searched = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
    boxes = selective_search(searched, mode, seed=seed)
    if searched is not image_bgr:
        gain = np.array([width / size[0], height / size[1]] * 2, dtype=np.float32)
        boxes = boxes * gain
    return filter_boxes(boxes, width, height, scaled_min_size(min_size, width, height, min_size_reference), max_boxes)
