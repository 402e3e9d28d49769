"""Detections drawn on their image, for a person to look at.

Boxes are 0-based continuous xyxy in image pixels (:mod:`spp_detect.boxes`); a box
``(x1, y1, x2, y2)`` covers pixels ``x1 .. x2 - 1``, so its outline is drawn on the
pixels ``floor(x1) .. ceil(x2) - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = ["draw_boxes"]

# 20 distinct colours (RGB), one per class index (tab20).
_PALETTE = [
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44), (152, 223, 138),
    (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213), (140, 86, 75), (196, 156, 148),
    (227, 119, 194), (247, 182, 210), (127, 127, 127), (199, 199, 199), (188, 189, 34), (219, 219, 141),
    (23, 190, 207), (158, 218, 229),
]


def draw_boxes(
    image_rgb: np.ndarray,
    boxes: np.ndarray,
    captions: Sequence[str],
    colour_index: Sequence[int],
    ground_truth: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of ``image_rgb`` (``np.ndarray[H, W, 3]`` uint8) with ``boxes``
    (``np.ndarray[K, 4]`` 0-based xyxy) outlined, each captioned (e.g. ``"dog 1.23"``) in the
    colour of its ``colour_index`` (class index), and ``ground_truth`` (``np.ndarray[G, 4]``)
    as dashed white outlines."""
    canvas = np.ascontiguousarray(image_rgb.copy())
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 250))
    font_scale = max(0.4, min(height, width) / 800)
    if ground_truth is not None:
        for box in np.asarray(ground_truth).reshape(-1, 4):
            x1, y1, x2, y2 = _pixels(box)
            for a, b in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
                _dashed_line(canvas, a, b, (255, 255, 255), thickness)
    for box, caption, index in zip(np.asarray(boxes).reshape(-1, 4), captions, colour_index):
        colour = _PALETTE[int(index) % len(_PALETTE)]
        x1, y1, x2, y2 = _pixels(box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = max(y1, th + base)
        cv2.rectangle(canvas, (x1, ty - th - base), (x1 + tw, ty), colour, -1)
        cv2.putText(canvas, caption, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def _pixels(box: np.ndarray) -> tuple[int, int, int, int]:
    x1, y1 = int(np.floor(box[0])), int(np.floor(box[1]))
    x2, y2 = int(np.ceil(box[2])) - 1, int(np.ceil(box[3])) - 1
    return x1, y1, max(x1, x2), max(y1, y2)


def _dashed_line(canvas: np.ndarray, a: tuple[int, int], b: tuple[int, int], colour, thickness: int, dash: int = 8) -> None:
    length = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
    for start in range(0, length, 2 * dash):
        t0, t1 = start / max(length, 1), min(start + dash, length) / max(length, 1)
        p0 = (round(a[0] + (b[0] - a[0]) * t0), round(a[1] + (b[1] - a[1]) * t0))
        p1 = (round(a[0] + (b[0] - a[0]) * t1), round(a[1] + (b[1] - a[1]) * t1))
        cv2.line(canvas, p0, p1, colour, thickness)
