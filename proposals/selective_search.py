"""Selective search windows for one image, as R-CNN and SPP-net used them.

Two pure functions:

* :func:`selective_search` runs OpenCV's ``cv2.ximgproc.segmentation`` selective search on
  a BGR image at its original resolution and returns every box in OpenCV's ranking order;
* :func:`filter_boxes` applies R-CNN's post-processing: clip to the image, drop boxes
  narrower or shorter than ``min_size`` pixels, drop exact duplicates (first occurrence
  wins), cap at ``max_boxes``.

Boxes are ``np.ndarray[N, 4]`` float32 in the project's one convention (0-based continuous
``(x1, y1, x2, y2)`` image pixels, see :mod:`spp_detect.boxes`).

Modes (FACTS 1.11; OpenCV ``selectivesearchsegmentation.cpp``):

* ``fast`` (the default): selective search's "fast mode" as the SPP-net paper (4.1) and
  R-CNN use it (``selective_search_boxes.m``), built from OpenCV parts: HSV + Lab, k = 50
  and 100 with segment min size = k, sigma 0.8, strategies {colour+texture+size+fill,
  texture+size+fill}. OpenCV's similarity and histogram code still differs from
  Uijlings' MATLAB code, so its boxes are not the precomputed VOC07 boxes (which nobody
  can reproduce: fast-rcnn#26, #41). On 200 VOC07 test images it covers 95.3% of objects
  at IoU 0.5 (``bench/results/proposals-fast.json``).
* ``opencv-fast``: OpenCV's own ``switchToSelectiveSearchFast``, which is *not* the paper's
  fast mode: HSV + Lab, Felzenszwalb k = 150, 300, 450 (segment min size 100), sigma 0.8,
  the same two strategies; 93.5% recall at the same speed.
* ``opencv-quality``: OpenCV's ``switchToSelectiveSearchQuality``: adds grey, H and rgI
  images, k = 150 .. 750 and the single fill and size strategies (about 3-4x slower).

Determinism: OpenCV ranks regions by ``rand() * level`` with the C library's global
``rand()``, so the order (and therefore which boxes survive ``max_boxes``) depends on how
many images a process has seen before. :func:`selective_search` re-seeds the C library's
generator with ``srand(seed)`` before each image, which makes the output a function of the
image alone (POSIX C libraries; on other platforms the order is not reproducible).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

import numpy as np
import torch

from spp_detect.boxes import clip_boxes, remove_small_boxes

__all__ = ["MODES", "R_CNN_MIN_SIZE", "R_CNN_MAX_BOXES", "selective_search", "filter_boxes", "propose"]

MODES: tuple[str, ...] = ("fast", "opencv-fast", "opencv-quality")

#: R-CNN ``selective_search_boxes.m``: ``FilterBoxesWidth(boxes, 20)`` keeps boxes whose
#: (inclusive) width and height are both at least 20 pixels.
R_CNN_MIN_SIZE = 20
#: R-CNN and SPP-net score "about 2,000" selective-search windows per image (fast mode).
R_CNN_MAX_BOXES = 2000

#: OpenCV defaults of switchToSelectiveSearchFast/Quality(base_k=150, inc_k=150, sigma=0.8).
_OPENCV_BASE_K, _OPENCV_INC_K, _SIGMA = 150, 150, 0.8
#: R-CNN fast mode: k in {50, 100}, Felzenszwalb minSize = k, sigma 0.8 (FACTS 1.11).
_R_CNN_KS = (50, 100)


def selective_search(image_bgr: np.ndarray, mode: str = "fast", *, seed: int = 0) -> np.ndarray:
    """Selective search boxes of one image, in OpenCV's ranking order, unfiltered.

    Args:
        image_bgr: ``np.ndarray[H, W, 3]`` uint8, BGR (as ``cv2.imread`` returns), at the
            resolution the boxes should live in (R-CNN and SPP-net used the original).
        mode: ``"fast"``, ``"opencv-fast"`` or ``"opencv-quality"`` (see the module docstring).
        seed: seed for the C library's ``rand()`` that OpenCV uses to rank regions.

    Returns:
        ``np.ndarray[N, 4]`` float32, 0-based continuous ``(x1, y1, x2, y2)`` image pixels,
        ``0 <= x1 < x2 <= W``, ``0 <= y1 < y2 <= H``; OpenCV's ``(x, y, w, h)`` rectangle
        covers pixels ``x .. x + w - 1``, i.e. the interval ``[x, x + w)``.

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
    import cv2

    segmentation = cv2.ximgproc.segmentation
    search = segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(image_bgr))
    if mode == "opencv-fast":
        search.switchToSelectiveSearchFast(_OPENCV_BASE_K, _OPENCV_INC_K, _SIGMA)
    elif mode == "opencv-quality":
        search.switchToSelectiveSearchQuality(_OPENCV_BASE_K, _OPENCV_INC_K, _SIGMA)
    else:
        _configure_rcnn_fast(search, image_bgr, cv2)
    _c_srand(seed)
    rects = np.asarray(search.process(), dtype=np.float32).reshape(-1, 4)  # [N, 4] (x, y, w, h)
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)  # [N, 4] xyxy


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


def propose(
    image_bgr: np.ndarray,
    mode: str = "fast",
    min_size: float = R_CNN_MIN_SIZE,
    max_boxes: int | None = R_CNN_MAX_BOXES,
    seed: int = 0,
    max_pixels: int | None = None,
) -> np.ndarray:
    """:func:`selective_search` then :func:`filter_boxes` on the image's own size.

    Args:
        max_pixels: an image with more pixels is searched on a copy shrunk (``INTER_AREA``)
            to at most this many, which bounds time and memory (OpenCV's selective search
            needs ~1 KB per pixel); its boxes are scaled back to the original pixels before
            filtering. ``None``: always the original (VOC images are <= 0.25 MP).

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
    return filter_boxes(boxes, width, height, min_size, max_boxes)


def _configure_rcnn_fast(search, image_bgr: np.ndarray, cv2) -> None:
    # R-CNN selective_search_boxes.m, fast mode: colorTypes {'Hsv', 'Lab'},
    # simFunctionHandles {ColourTextureSizeFill, TextureSizeFill}, ks [50 100], sigma 0.8,
    # minSize = k for the Felzenszwalb segmentation.
    segmentation = cv2.ximgproc.segmentation
    search.clearImages()
    search.clearGraphSegmentations()
    search.clearStrategies()
    search.addImage(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2HSV))
    search.addImage(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2Lab))
    for k in _R_CNN_KS:
        search.addGraphSegmentation(segmentation.createGraphSegmentation(_SIGMA, float(k), k))
    colour = segmentation.createSelectiveSearchSegmentationStrategyColor
    texture = segmentation.createSelectiveSearchSegmentationStrategyTexture
    size = segmentation.createSelectiveSearchSegmentationStrategySize
    fill = segmentation.createSelectiveSearchSegmentationStrategyFill
    search.addStrategy(segmentation.createSelectiveSearchSegmentationStrategyMultiple(colour(), texture(), size(), fill()))
    search.addStrategy(segmentation.createSelectiveSearchSegmentationStrategyMultiple(texture(), size(), fill()))


@lru_cache(maxsize=1)
def _libc_srand():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        return libc.srand
    except (OSError, AttributeError):
        return None


def _c_srand(seed: int) -> None:
    srand = _libc_srand()
    if srand is not None:
        srand(ctypes.c_uint(seed & 0xFFFFFFFF))
