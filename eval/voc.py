"""PASCAL VOC detection AP: a Python re-implementation of the VOC devkit's ``VOCevaldet.m``.

The algorithm of the official devkit (VOCdevkit2007 ``VOCcode/VOCevaldet.m``, copy at
ShaoqingRen/SPP_net ``datasets/VOCdevkit2007/VOCcode/VOCevaldet.m``), per class:

1. sort the detections by descending score (MATLAB ``sort(-confidence)``, a stable
   sort: tied scores keep their file order);
2. match each detection to the ground-truth box of its image with the highest IoU, in
   the devkit's 1-based inclusive pixel frame (``w = x2 - x1 + 1``), counting only
   boxes that intersect (``iw > 0 & ih > 0``) and keeping the first of equal maxima;
3. if that IoU ``>= 0.5`` (``VOCopts.minoverlap``): a difficult box makes the detection
   neither a true nor a false positive; otherwise the detection is a true positive if
   the box is not yet taken (and takes it), else a false positive (duplicate). Below
   the threshold, a false positive;
4. recall = cumulated TP / number of non-difficult boxes, precision = TP / (TP + FP);
5. AP: 11-point (VOC2007: mean over ``t = 0:0.1:1`` of ``max(prec(rec >= t))``) or the
   area under the precision envelope (VOC2010+ devkit, ``use_07_metric=False``).

``rule="py-faster-rcnn"`` reproduces py-faster-rcnn's ``lib/datasets/voc_eval.py``
(@ d66cc2b), which differs in three places:

* a match needs IoU ``> 0.5`` (strict) where the devkit has ``>=``;
* ``np.argsort(-confidence)`` (quicksort, not stable): the order of tied scores is
  implementation-defined, where MATLAB keeps file order; py-faster-rcnn also writes
  3-decimal scores, which creates ties (docs/sources.md 3.2);
* the 11 recall thresholds are ``np.arange(0., 1.1, 0.1)``, whose 7th and 8th values are
  ``0.6000000000000001`` and ``0.7000000000000001``; MATLAB's colon operator builds
  ``0:0.1:1`` from both ends (first half ``0 + k * 0.1``, second half ``1 - (10 - k) * 0.1``,
  middle ``0.5``; MathWorks solution 1-4FLI96, ``colonop.m``), giving the doubles
  nearest 0.6 and 0.7. A recall of exactly 0.6 or 0.7 (e.g. 6 of 10 objects) counts at
  that threshold in the devkit only. Both share ``0.30000000000000004``.

Both rules use the ``+ 1`` IoU. Where only difficult matches have been seen so far,
precision is 0/0: the devkit's NaN is skipped by MATLAB's ``max``; here it is 0 (as in
py-faster-rcnn's later ``np.maximum(tp + fp, eps)``), which gives the same AP.

Parsed annotations are cached in memory by :func:`spp_detect.datasets.voc.read_voc`
(``functools.lru_cache`` keyed by file path and modification stamp), never in an
unkeyed pickle (py-faster-rcnn's ``annots.pkl`` goes stale across image sets).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from eval.results import ClassDetections, DetectionsError, to_devkit_frame
from spp_detect.datasets.voc import VOC_CLASSES, VOCImage

__all__ = [
    "RULES",
    "ClassAP",
    "VOCEvaluation",
    "voc07_recall_thresholds",
    "voc_ap",
    "devkit_iou",
    "voc_eval",
    "evaluate_voc",
    "match_detections",
    "CORRECT",
    "WRONG",
    "IGNORED",
]

logger = logging.getLogger(__name__)

#: Matching rules: the official MATLAB devkit, or py-faster-rcnn's voc_eval.py.
RULES = ("devkit", "py-faster-rcnn")

# Detections x ground-truth slots per IoU block, to bound memory (~8 MB per float64 temporary).
_IOU_BLOCK = 1 << 20


def voc07_recall_thresholds(rule: str = "devkit") -> np.ndarray:
    """The 11 recall thresholds of the VOC2007 AP, as each implementation computes them.

    Args:
        rule: ``"devkit"``: MATLAB's ``0:0.1:1`` (first half ``0 + k * 0.1``, second half
            ``1 - (10 - k) * 0.1``, middle ``(0 + 1) / 2``; MathWorks solution 1-4FLI96).
            ``"py-faster-rcnn"``: ``np.arange(0., 1.1, 0.1)`` (voc_eval.py ``voc_ap``).

    Returns:
        ``np.ndarray[11]`` float64. They differ at index 6 and 7: the devkit's are the
        doubles nearest 0.6 and 0.7, numpy's are one ulp above.
    """
    _check_rule(rule)
    if rule == "py-faster-rcnn":
        return np.arange(0.0, 1.1, 0.1)
    start, stop, step, n = 0.0, 1.0, 0.1, 10
    thresholds = np.empty(n + 1)
    for k in range(n // 2 + 1):
        thresholds[k] = start + k * step
        thresholds[n - k] = stop - k * step
    thresholds[n // 2] = (start + stop) / 2
    return thresholds


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool, rule: str = "devkit") -> float:
    """Average precision of one precision/recall curve, as the VOC devkit computes it.

    Args:
        rec: ``np.ndarray[D]`` recall after each ranked detection (non-decreasing, in
            ``[0, 1]``). May be empty (no detections: AP 0).
        prec: ``np.ndarray[D]`` precision after each ranked detection.
        use_07_metric: True: VOC2007 11-point AP, the mean over the 11 thresholds ``t`` of
            ``max(prec[rec >= t])`` (0 where no recall reaches ``t``); False: the VOC2010+
            area under the monotone precision envelope, summed where recall changes.
        rule: which 11 thresholds (see :func:`voc07_recall_thresholds`); no effect on the
            area AP, which both implementations compute alike.

    Returns:
        AP in ``[0, 1]`` as a Python float.
    """
    rec = np.asarray(rec, dtype=np.float64).reshape(-1)
    prec = np.asarray(prec, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"[voc_ap] rec and prec must have the same length, got {rec.shape} and {prec.shape}")
    if use_07_metric:
        ap = 0.0
        for t in voc07_recall_thresholds(rule):  # VOCevaldet.m: ap = ap + p / 11, in this order
            above = rec >= t
            p = float(prec[above].max()) if above.any() else 0.0
            ap = ap + p / 11
        return ap
    # VOC2010+ devkit (and py-faster-rcnn's "correct AP calculation"): sentinels, then the
    # precision envelope, then sum delta-recall * precision where recall changes.
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def devkit_iou(boxes: np.ndarray, gt_boxes: np.ndarray, gt_valid: np.ndarray | None = None) -> np.ndarray:
    """IoU of each box with its own row of ground-truth boxes, with the devkit's ``+ 1`` rule.

    Both inputs are in the devkit's frame (1-based inclusive pixels, see
    :func:`eval.results.to_devkit_frame`), and the arithmetic follows ``VOCevaldet.m``
    operation by operation, so that values equal the devkit's bit for bit:
    ``iw = min(x2) - max(x1) + 1``, ``ua = (area_det + area_gt) - iw * ih``,
    ``iou = iw * ih / ua``, each area with ``+ 1`` widths.

    Args:
        boxes: ``[K, 4]`` float64 detection boxes.
        gt_boxes: ``[K, M, 4]`` float64, the candidate ground truth of each detection.
        gt_valid: ``[K, M]`` bool, False for padding slots; ``None``: all valid.

    Returns:
        ``np.ndarray[K, M]`` float64 IoU, ``-inf`` where the boxes do not intersect
        (``iw <= 0`` or ``ih <= 0``, which the devkit skips) or the slot is padding.
    """
    det = boxes[:, None, :]  # [K, 1, 4]
    ix1 = np.maximum(det[..., 0], gt_boxes[..., 0])  # [K, M]
    iy1 = np.maximum(det[..., 1], gt_boxes[..., 1])
    ix2 = np.minimum(det[..., 2], gt_boxes[..., 2])
    iy2 = np.minimum(det[..., 3], gt_boxes[..., 3])
    iw = ix2 - ix1 + 1
    ih = iy2 - iy1 + 1
    inter = iw * ih
    det_area = (det[..., 2] - det[..., 0] + 1) * (det[..., 3] - det[..., 1] + 1)  # [K, 1]
    gt_area = (gt_boxes[..., 2] - gt_boxes[..., 0] + 1) * (gt_boxes[..., 3] - gt_boxes[..., 1] + 1)
    union = det_area + gt_area - inter
    keep = (iw > 0) & (ih > 0)
    if gt_valid is not None:
        keep &= gt_valid
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where(keep, iou, -np.inf)


class ClassAP(NamedTuple):
    """Result of :func:`voc_eval` for one class.

    Attributes:
        rec: ``np.ndarray[D]`` float64 recall after each detection in rank order (all
            ``D`` detections, ignored ones included, as in the devkit); NaN if ``npos == 0``.
        prec: ``np.ndarray[D]`` float64 precision after each detection in rank order.
        ap: the average precision (NaN if the class has no non-difficult object).
        npos: number of non-difficult ground-truth objects.
        tp: ``np.ndarray[D]`` bool, true positives in rank order.
        fp: ``np.ndarray[D]`` bool, false positives in rank order (neither: ignored).
        order: ``np.ndarray[D]`` int64, rank -> index into the input detections.
    """

    rec: np.ndarray
    prec: np.ndarray
    ap: float
    npos: int
    tp: np.ndarray
    fp: np.ndarray
    order: np.ndarray


def voc_eval(
    det_image_ids: Sequence[str] | np.ndarray,
    det_scores: np.ndarray,
    det_boxes: np.ndarray,
    gt_image_ids: Sequence[str],
    gt_boxes: Sequence[np.ndarray],
    gt_difficult: Sequence[np.ndarray],
    *,
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
    rule: str = "devkit",
) -> ClassAP:
    """Precision, recall and AP of one class's detections (``VOCevaldet.m``, vectorised).

    The devkit's loop over ranked detections is computed without a Python loop: each
    detection's max-IoU box does not depend on which boxes are already taken, so among
    the detections whose best box passes the threshold and is not difficult, the first in
    rank order per box is the true positive and the rest are duplicates (false positives).

    Args:
        det_image_ids: ``[D]`` image id of each detection; each must be in ``gt_image_ids``.
        det_scores: ``[D]`` float scores (higher first).
        det_boxes: ``[D, 4]`` 0-based continuous xyxy, original-image pixels.
        gt_image_ids: ``[N]`` the image set (unique ids).
        gt_boxes: ``N`` arrays ``[M_i, 4]``, 0-based continuous xyxy boxes of this class.
        gt_difficult: ``N`` bool arrays ``[M_i]``, the devkit's difficult flags.
        iou_threshold: ``VOCopts.minoverlap``, in ``(0, 1]``.
        use_07_metric: 11-point AP (VOC2007) or area AP (VOC2010+).
        rule: ``"devkit"`` (IoU ``>=`` threshold, stable sort, MATLAB thresholds) or
            ``"py-faster-rcnn"`` (``>``, ``np.argsort``, ``np.arange`` thresholds).

    Returns:
        :class:`ClassAP`.

    Raises:
        DetectionsError: a detection names an image outside ``gt_image_ids``.
        ValueError: bad shapes, duplicate image ids, unknown rule or threshold.
    """
    _check_rule(rule)
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"[voc_eval] iou_threshold must be in (0, 1], got {iou_threshold}")
    dets = ClassDetections(det_image_ids, det_scores, det_boxes)
    num_images = len(gt_image_ids)
    if not len(gt_boxes) == len(gt_difficult) == num_images:
        raise ValueError(
            f"[voc_eval] gt_image_ids, gt_boxes and gt_difficult must have the same length, got "
            f"{num_images}, {len(gt_boxes)}, {len(gt_difficult)}"
        )
    image_index = {image_id: i for i, image_id in enumerate(gt_image_ids)}
    if len(image_index) != num_images:
        raise ValueError("[voc_eval] gt_image_ids contains duplicates")
    counts = np.array([len(b) for b in gt_boxes], dtype=np.int64)  # [N]
    difficult_flat = np.concatenate([np.asarray(d, dtype=bool).reshape(-1) for d in gt_difficult] + [np.zeros(0, bool)])
    if len(difficult_flat) != counts.sum():
        raise ValueError("[voc_eval] each gt_difficult array must match its gt_boxes array")
    npos = int((~difficult_flat).sum())

    # 1. Rank: MATLAB's sort is stable; np.argsort's default quicksort is not.
    kind = "stable" if rule == "devkit" else "quicksort"
    order = np.argsort(-dets.scores, kind=kind)  # [D]
    num_dets = len(order)

    # Image index of each ranked detection (the devkit errors on unknown images too).
    unique_ids, inverse = np.unique(dets.image_ids, return_inverse=True)
    unique_index = np.array([image_index.get(i, -1) for i in unique_ids.tolist()], dtype=np.int64)
    if (unique_index < 0).any():
        unknown = unique_ids[unique_index < 0].tolist()
        shown = ", ".join(repr(u) for u in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise DetectionsError(f"{len(unknown)} detection image id(s) not in the image set: {shown}")
    det_image = unique_index[inverse.reshape(-1)][order]  # [D]

    # 2. Max-IoU ground truth per detection, in the devkit frame. Ground truth is padded
    # to [N, M, 4]; slot j of image i is flat index i * M + j.
    max_gt = int(counts.max()) if num_images else 0
    best_iou = np.full(num_dets, -np.inf)  # [D]
    best_slot = np.zeros(num_dets, dtype=np.int64)  # [D]
    if max_gt > 0 and num_dets > 0:
        gt_padded = np.zeros((num_images, max_gt, 4))
        valid = np.arange(max_gt)[None, :] < counts[:, None]  # [N, M]
        gt_padded[valid] = to_devkit_frame(np.concatenate([np.asarray(b).reshape(-1, 4) for b in gt_boxes]))
        boxes_devkit = to_devkit_frame(dets.boxes)[order]  # [D, 4]
        step = max(1, _IOU_BLOCK // max_gt)
        for start in range(0, num_dets, step):
            block = slice(start, start + step)
            iou = devkit_iou(boxes_devkit[block], gt_padded[det_image[block]], valid[det_image[block]])  # [B, M]
            j = np.argmax(iou, axis=1)  # first of equal maxima, like the devkit's "ov > ovmax"
            best_slot[block] = j
            best_iou[block] = iou[np.arange(len(j)), j]
        difficult_padded = np.zeros((num_images, max_gt), dtype=bool)
        difficult_padded[valid] = difficult_flat
        difficult_hit = difficult_padded.reshape(-1)[det_image * max_gt + best_slot]  # [D]
    else:
        difficult_hit = np.zeros(num_dets, dtype=bool)

    # 3. TP / FP / ignored.
    passes = best_iou >= iou_threshold if rule == "devkit" else best_iou > iou_threshold
    candidate = np.flatnonzero(passes & ~difficult_hit)  # ranks, ascending
    _, first = np.unique((det_image * max_gt + best_slot)[candidate], return_index=True)
    tp = np.zeros(num_dets, dtype=bool)
    tp[candidate[first]] = True
    fp = ~passes | ((passes & ~difficult_hit) & ~tp)

    # 4. Precision / recall; 5. AP.
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(fp, dtype=np.float64)
    prec = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    if npos == 0:
        rec = np.full(num_dets, np.nan)
        ap = float("nan")
    else:
        rec = tp_cum / npos
        ap = voc_ap(rec, prec, use_07_metric, rule)
    return ClassAP(rec, prec, ap, npos, tp, fp, order)


@dataclass(frozen=True)
class VOCEvaluation:
    """Per-class results of :func:`evaluate_voc` (a Python re-implementation of the VOC devkit).

    Attributes:
        per_class: class name -> :class:`ClassAP`, in class order.
        use_07_metric, rule, iou_threshold: the settings used.
        num_images: size of the image set.
        num_detections: class name -> number of detections evaluated.
    """

    per_class: dict[str, ClassAP]
    use_07_metric: bool
    rule: str
    iou_threshold: float
    num_images: int
    num_detections: dict[str, int] = field(default_factory=dict)

    @property
    def ap(self) -> dict[str, float]:
        """Class name -> AP (NaN for a class without non-difficult objects)."""
        return {name: result.ap for name, result in self.per_class.items()}

    @property
    def map(self) -> float:
        """Mean AP over the classes that have non-difficult objects (NaN if none has)."""
        values = [ap for ap in self.ap.values() if not np.isnan(ap)]
        return float(np.mean(values)) if values else float("nan")

    def to_json(self) -> dict:
        """JSON-ready summary: ``{"ap": {class: AP}, "map": mAP, ...}``; NaN -> ``None``."""

        def clean(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return {
            "ap": {name: clean(ap) for name, ap in self.ap.items()},
            "map": clean(self.map),
            "npos": {name: result.npos for name, result in self.per_class.items()},
            "num_detections": dict(self.num_detections),
            "metric": "11point" if self.use_07_metric else "area",
            "rule": self.rule,
            "iou_threshold": self.iou_threshold,
            "num_images": self.num_images,
            "implementation": "Python re-implementation of the VOC devkit (VOCevaldet.m)",
        }


def evaluate_voc(
    detections: Mapping[str, ClassDetections],
    images: Sequence[VOCImage],
    *,
    classes: Sequence[str] = VOC_CLASSES,
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
    rule: str = "devkit",
) -> VOCEvaluation:
    """Evaluate detections on an image set, class by class, with :func:`voc_eval`.

    Args:
        detections: class name -> :class:`ClassDetections` (0-based xyxy boxes); a class
            that is absent has no detections and scores AP 0.
        images: the image set with its ground truth (:func:`spp_detect.datasets.voc.read_voc`);
            ``labels`` index into ``classes``.
        classes: class names, in label order.
        iou_threshold, use_07_metric, rule: see :func:`voc_eval`.

    Returns:
        :class:`VOCEvaluation` with AP, precision and recall per class and the mAP.

    Raises:
        DetectionsError: a class name outside ``classes``, or an image id outside ``images``.
    """
    unknown = sorted(set(detections) - set(classes))
    if unknown:
        raise DetectionsError(f"detections for unknown classes {unknown}; expected names from {list(classes)}")
    image_ids = [image.image_id for image in images]
    per_class: dict[str, ClassAP] = {}
    num_detections: dict[str, int] = {}
    for label, class_name in enumerate(classes):
        masks = [image.labels == label for image in images]
        dets = detections.get(class_name, ClassDetections.empty())
        try:
            result = voc_eval(
                dets.image_ids,
                dets.scores,
                dets.boxes,
                image_ids,
                [image.boxes[mask] for image, mask in zip(images, masks)],
                [image.difficult[mask] for image, mask in zip(images, masks)],
                iou_threshold=iou_threshold,
                use_07_metric=use_07_metric,
                rule=rule,
            )
        except DetectionsError as exc:
            raise DetectionsError(f"class {class_name!r}: {exc}") from None
        if result.npos == 0:
            logger.warning("class %r has no non-difficult object in the image set: AP undefined (NaN)", class_name)
        per_class[class_name] = result
        num_detections[class_name] = len(dets)
    return VOCEvaluation(per_class, use_07_metric, rule, float(iou_threshold), len(images), num_detections)


#: What :func:`match_detections` says of each detection.
CORRECT, WRONG, IGNORED = 1, 0, -1


def match_detections(
    scores: np.ndarray,
    boxes: np.ndarray,
    gt_boxes: np.ndarray,
    gt_difficult: np.ndarray,
    *,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """Which detections of one class in one image are correct, by the devkit's rule.

    The detections are matched as ``VOCevaldet.m`` matches them (:func:`voc_eval` on this
    one image): in decreasing score order (stable), each takes the ground-truth box it
    overlaps most (devkit IoU, ``+ 1`` widths) if that IoU is ``>= iou_threshold`` and the
    box is not yet taken; a detection whose best box is difficult is neither right nor
    wrong.

    Args:
        scores: ``[K]`` float scores.
        boxes: ``[K, 4]`` 0-based continuous xyxy, image pixels.
        gt_boxes: ``[G, 4]`` 0-based xyxy ground truth of the class in the image.
        gt_difficult: ``[G]`` bool, the devkit's difficult flags.
        iou_threshold: ``VOCopts.minoverlap``.

    Returns:
        ``np.ndarray[K]`` int8, in input order: :data:`CORRECT` (1), :data:`WRONG` (0) or
        :data:`IGNORED` (-1, on a difficult object).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    result = voc_eval(np.full(len(scores), "image"), scores, boxes, ["image"], [np.asarray(gt_boxes).reshape(-1, 4)],
                      [np.asarray(gt_difficult, dtype=bool).reshape(-1)], iou_threshold=iou_threshold)
    status = np.full(len(scores), IGNORED, dtype=np.int8)
    status[result.order[result.tp]] = CORRECT
    status[result.order[result.fp]] = WRONG
    return status


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose from {list(RULES)}")
