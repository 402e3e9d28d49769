"""Detections drawn on their image, for a person to look at.

Boxes are 0-based continuous xyxy in image pixels (:mod:`spp_detect.boxes`); a box
``(x1, y1, x2, y2)`` covers pixels ``x1 .. x2 - 1``, so its outline is drawn on the
pixels ``floor(x1) .. ceil(x2) - 1``.

Captions are kept inside the picture and off each other (each moves down, then inside its
box, until it overlaps no earlier one). An image whose longer side is under
:data:`MIN_PICTURE_SIDE` px is drawn on a copy enlarged by a whole factor
(:func:`picture`), so that its captions fit at a readable size.

``show`` colours each detection by whether it is right (:func:`show_detections`): the
devkit's rule, :func:`eval.voc.match_detections`, against the image's ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

__all__ = ["MIN_PICTURE_SIDE", "CORRECT_COLOUR", "WRONG_COLOUR", "IGNORED_COLOUR", "draw_boxes", "picture",
           "contact_sheet", "show_detections", "judged_rows", "sheet_counts"]

#: Pictures of smaller images (longer side, pixels) are drawn on an enlarged copy: VOC's
#: 500 px images take captions at the smallest font (0.4) without crowding.
MIN_PICTURE_SIDE = 500
#: RGB colours of ``show``'s boxes: correct (IoU >= 0.5 with a ground-truth box of the
#: class, the devkit's rule), wrong, and on a difficult object (the devkit ignores it).
CORRECT_COLOUR, WRONG_COLOUR, IGNORED_COLOUR = (0, 200, 0), (230, 30, 30), (255, 190, 0)

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
    colours: Sequence[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """A copy of ``image_rgb`` (``np.ndarray[H, W, 3]`` uint8) with ``boxes``
    (``np.ndarray[K, 4]`` 0-based xyxy) outlined, each captioned (e.g. ``"dog 1.23"``) in the
    colour of its ``colour_index`` (class index) or, if given, its ``colours`` entry (RGB),
    and ``ground_truth`` (``np.ndarray[G, 4]``) as dashed white outlines. Captions stay
    inside the image and do not overlap (:func:`_place_caption`)."""
    canvas = np.ascontiguousarray(image_rgb.copy())
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 250))
    font_scale = max(0.4, min(height, width) / 800)
    if ground_truth is not None:
        for box in np.asarray(ground_truth).reshape(-1, 4):
            x1, y1, x2, y2 = _pixels(box)
            for a, b in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
                _dashed_line(canvas, a, b, (255, 255, 255), thickness)
    placed: list[tuple[int, int, int, int]] = []
    boxes = np.asarray(boxes).reshape(-1, 4)
    for number, (box, caption, index) in enumerate(zip(boxes, captions, colour_index)):
        colour = tuple(colours[number]) if colours is not None else _PALETTE[int(index) % len(_PALETTE)]
        x1, y1, x2, y2 = _pixels(box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        left, top = _place_caption((x1, y1, x2, y2), tw, th + base, width, height, placed)
        placed.append((left, top, left + tw, top + th + base))
        cv2.rectangle(canvas, (left, top), (left + tw, top + th + base), colour, -1)
        cv2.putText(canvas, caption, (left, top + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def _place_caption(box: tuple[int, int, int, int], text_width: int, text_height: int, width: int, height: int,
                   placed: Sequence[tuple[int, int, int, int]]) -> tuple[int, int]:
    """``(left, top)`` pixel of a caption for ``box`` (pixel corners ``x1, y1, x2, y2``):
    above the box's top-left corner as far as the image allows, moved left to end inside
    the image, then down one caption height at a time (past the box's top: inside it)
    until it overlaps none of the ``placed`` caption rectangles ``(l, t, r, b)``; where no
    free place is left, the first one."""
    left = max(0, min(box[0], width - text_width))
    first = max(0, min(box[1] - text_height, height - text_height))
    top = first
    while any(left < r and l < left + text_width and top < b and t < top + text_height for l, t, r, b in placed):
        top += text_height
        if top > height - text_height:
            return left, first
    return left, top


def picture(
    image_rgb: np.ndarray,
    boxes: np.ndarray,
    captions: Sequence[str],
    colour_index: Sequence[int],
    ground_truth: np.ndarray | None = None,
    colours: Sequence[tuple[int, int, int]] | None = None,
    min_side: int = MIN_PICTURE_SIDE,
) -> np.ndarray:
    """:func:`draw_boxes` on ``image_rgb`` as it is or, if its longer side is under
    ``min_side`` px, on a copy enlarged ``ceil(min_side / longer side)`` times (bicubic)
    with the boxes scaled alike, so that captions of a small image (e.g. 400 x 226) are
    drawn at a readable size without running past its edge or over each other.

    Returns:
        ``np.ndarray[f H, f W, 3]`` uint8, ``f`` the (whole) enlargement factor, 1 for
        images of ``min_side`` px or more.
    """
    height, width = image_rgb.shape[:2]
    factor = -(-min_side // max(height, width, 1)) if max(height, width) < min_side else 1
    if factor > 1:
        image_rgb = cv2.resize(image_rgb, (width * factor, height * factor), interpolation=cv2.INTER_CUBIC)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * factor
        ground_truth = None if ground_truth is None else np.asarray(ground_truth, dtype=np.float64).reshape(-1, 4) * factor
    return draw_boxes(image_rgb, boxes, captions, colour_index, ground_truth, colours)


def contact_sheet(images: Sequence[np.ndarray], columns: int = 3, tile_height: int = 320, gap: int = 4) -> np.ndarray:
    """Several pictures side by side on one sheet, for a person to look at in one go.

    Each ``np.ndarray[H, W, 3]`` uint8 image is resized (aspect kept, ``INTER_AREA``) to
    ``tile_height`` rows and padded to the widest tile; tiles fill ``columns`` per row,
    in order, separated by ``gap`` white pixels.

    Returns:
        ``np.ndarray[R, C, 3]`` uint8; ``[0, 0, 3]`` for no images.
    """
    if columns < 1 or tile_height < 1:
        raise ValueError(f"contact_sheet: columns and tile_height must be positive, got {columns}, {tile_height}")
    if len(images) == 0:
        return np.zeros((0, 0, 3), np.uint8)
    tiles = []
    for image in images:
        height, width = image.shape[:2]
        size = (max(1, round(width * tile_height / height)), tile_height)
        tiles.append(cv2.resize(image, size, interpolation=cv2.INTER_AREA))
    tile_width = max(t.shape[1] for t in tiles)
    rows = -(-len(tiles) // columns)
    columns = min(columns, len(tiles))
    sheet = np.full((rows * (tile_height + gap) - gap, columns * (tile_width + gap) - gap, 3), 255, np.uint8)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * (tile_height + gap), (index % columns) * (tile_width + gap)
        sheet[top : top + tile_height, left : left + tile.shape[1]] = tile
    return sheet


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


def show_detections(detections: Path, images: Sequence, out: Path, image_set: str, threshold: float = 0.0, top: int = 20,
                    ground_truth: bool = True, classes: Sequence[str] | None = None, columns: int = 3,
                    result_ids=None) -> list[tuple[int, int]]:
    """Draw the detections of annotated images (``VOCImage``-like: ``image_id``, ``path``,
    ``boxes``, ``labels``, ``difficult``) read from ``detections`` (a detect folder, devkit
    result files or a COCO json; ``result_ids`` for a json in a COCO dataset's ids), those
    scoring above ``threshold``, at most ``top`` per image, best first, with class names
    and scores (and the ground truth dashed white); write the picture to ``out`` (PNG or
    JPEG): one image as it is (:func:`picture`), several as a :func:`contact_sheet` of
    ``columns`` per row. ``classes`` name the detections' classes (default: VOC's 20).

    Each drawn box is green when it is correct, red when not, amber when it lies on a
    difficult object (:data:`CORRECT_COLOUR`, ...): the devkit's rule among the drawn
    boxes of its class and image (:func:`eval.voc.match_detections`: IoU >= 0.5 with a
    ground-truth box of its class that no higher-scoring box took).

    Returns:
        ``(detections drawn, correct ones)`` of each image, in order.

    Raises:
        ValueError: no images, or ``out`` has an extension OpenCV cannot write.
    """
    import cv2

    from eval.results import read_detections
    from eval.voc import CORRECT, WRONG
    from spp_detect.datasets.voc import VOC_CLASSES
    from spp_detect.image_trunk import load_image_rgb

    if not images:
        raise ValueError("show_detections: no image to draw")
    classes = VOC_CLASSES if classes is None else classes
    dets = read_detections(detections, image_set, classes=classes, result_ids=result_ids)
    pictures, counts = [], []
    for image in images:
        rows, status = judged_rows(dets, image, classes, threshold, top)
        colours = [{CORRECT: CORRECT_COLOUR, WRONG: WRONG_COLOUR}.get(v, IGNORED_COLOUR) for v in status.tolist()]
        pictures.append(picture(load_image_rgb(image.path), np.array([r[3] for r in rows]).reshape(-1, 4),
                                [f"{r[2]} {r[0]:.2f}" for r in rows], [r[1] for r in rows],
                                ground_truth=image.boxes if ground_truth else None, colours=colours))
        counts.append((len(rows), int((status == CORRECT).sum())))
    canvas = pictures[0] if len(pictures) == 1 else contact_sheet(pictures, columns=columns)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), canvas[:, :, ::-1]):
        raise ValueError(f"cannot write {out} (is the extension .png or .jpg?)")
    return counts


def judged_rows(dets, image, classes: Sequence[str], threshold: float, top: int) -> tuple[list[tuple], np.ndarray]:
    """What ``show`` draws on ``image``: its detections in ``dets`` (``{class name:
    ClassDetections}``) scoring above ``threshold``, at most ``top``, best first, as rows
    ``(score, class index, name, box)`` (box 0-based xyxy), and each row's
    :data:`~eval.voc.CORRECT` / ``WRONG`` / ``IGNORED`` status (:func:`_judge`)."""
    rows = []
    for c, name in enumerate(classes):
        d = dets.get(name)
        if d is not None:
            mine = (d.image_ids == image.image_id) & (d.scores > threshold)
            rows += [(float(s), c, name, b) for s, b in zip(d.scores[mine], d.boxes[mine])]
    rows = sorted(rows, key=lambda r: -r[0])[:top]
    return rows, _judge(image, rows)


def sheet_counts(dets, images: Sequence, classes: Sequence[str], threshold: float = 0.0, top: int = 3) -> dict[str, int]:
    """What a ``show`` sheet of ``images`` would count, without drawing it: images with at
    least one detection drawn, detections drawn, correct ones (:func:`judged_rows`)."""
    from eval.voc import CORRECT

    shown = drawn = correct = 0
    for image in images:
        rows, status = judged_rows(dets, image, classes, threshold, top)
        shown += bool(rows)
        drawn += len(rows)
        correct += int((status == CORRECT).sum())
    return {"images": len(images), "images_with_detections": shown, "drawn": drawn, "correct": correct}


def _judge(image, rows: Sequence[tuple]) -> np.ndarray:
    """``np.ndarray[K]`` int8: :data:`~eval.voc.CORRECT`, ``WRONG`` or ``IGNORED`` of each
    drawn row ``(score, class index, name, box)``, class by class against ``image``'s ground truth."""
    from eval.voc import WRONG, match_detections

    status = np.full(len(rows), WRONG, dtype=np.int8)
    for c in {r[1] for r in rows}:
        mine = [i for i, r in enumerate(rows) if r[1] == c]
        of_class = np.asarray(image.labels) == c
        status[mine] = match_detections(np.array([rows[i][0] for i in mine]), np.array([rows[i][3] for i in mine]),
                                        np.asarray(image.boxes)[of_class], np.asarray(image.difficult)[of_class])
    return status
