"""PASCAL VOC classification AP: a Python re-implementation of the devkit's ``VOCevalcls.m``.

The algorithm of the official devkit (VOCdevkit2007 ``VOCcode/VOCevalcls.m``), per class:

1. ground truth per image: ``1`` if the image holds a non-difficult object of the class,
   ``0`` if it holds only difficult ones (the devkit's ``<class>_<set>.txt`` lists write
   ``0``), ``-1`` otherwise;
2. every image of the set gets its score from the result file; an image the file does not
   mention scores ``-inf`` (``out = ones(size(gt)) * -inf``);
3. images are ranked by descending score (MATLAB ``sort(-out)``, stable: ties keep the
   image-list order); ``tp = gt > 0``, ``fp = gt < 0``, so ``0`` images are neither;
4. recall = cumulated TP / number of positives, precision = TP / (TP + FP);
5. VOC2007: 11-point AP with the same thresholds as detection
   (:func:`eval.voc.voc_ap`); VOC2010+: the area under the precision envelope.

Where only ignored images have been ranked so far, precision is 0/0; MATLAB's ``max``
skips the NaN, here it is 0, which gives the same AP (as in :mod:`eval.voc`).

Result files are the devkit's ``<comp>_cls_<image_set>_<class>.txt`` with one
``<image_id> <score>`` line per image (:func:`write_cls_results`, :func:`read_cls_results`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.results import DetectionsError
from eval.voc import voc_ap
from spp_detect.datasets.voc import VOC_CLASSES, VOCImage

__all__ = [
    "ClsEvaluation",
    "voc_cls_ground_truth",
    "voc_cls_ap",
    "evaluate_voc_cls",
    "write_cls_results",
    "read_cls_results",
]


def voc_cls_ground_truth(images: Sequence[VOCImage], num_classes: int = len(VOC_CLASSES)) -> np.ndarray:
    """``np.ndarray[N, K]`` int8 image labels as the devkit's ``<class>_<set>.txt`` lists:
    ``1`` a non-difficult object of the class, ``0`` only difficult ones, ``-1`` none."""
    gt = np.full((len(images), num_classes), -1, dtype=np.int8)
    for row, image in enumerate(images):
        gt[row, np.unique(image.labels[image.difficult])] = 0
        gt[row, np.unique(image.labels[~image.difficult])] = 1
    return gt


def voc_cls_ap(scores: np.ndarray, gt: np.ndarray, use_07_metric: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """AP of one class, as ``VOCevalcls.m``.

    Args:
        scores: ``np.ndarray[N]`` one score per image of the set (``-inf`` for an image the
            result file does not mention), in image-list order.
        gt: ``np.ndarray[N]`` in ``{1, 0, -1}`` (:func:`voc_cls_ground_truth`).
        use_07_metric: 11-point (VOC2007) or area (VOC2010+) AP.

    Returns:
        ``(ap, rec np.ndarray[N], prec np.ndarray[N])``, recall and precision after each
        ranked image.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    gt = np.asarray(gt).reshape(-1)
    if scores.shape != gt.shape:
        raise ValueError(f"scores and gt must have the same length, got {scores.shape} and {gt.shape}")
    order = np.argsort(-scores, kind="stable")  # MATLAB sort(-out): stable
    tp = np.cumsum(gt[order] > 0)
    fp = np.cumsum(gt[order] < 0)
    npos = int((gt > 0).sum())
    rec = tp / npos if npos else np.zeros(len(tp))
    prec = np.divide(tp, tp + fp, out=np.zeros(len(tp)), where=(tp + fp) > 0)
    return voc_ap(rec, prec, use_07_metric), rec, prec


@dataclass
class ClsEvaluation:
    """AP per class and their mean. ``positives``: images with label 1 per class."""

    ap: dict[str, float]
    positives: dict[str, int]
    num_images: int
    use_07_metric: bool
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (rec, prec)

    @property
    def map(self) -> float:
        return float(np.mean(list(self.ap.values())))

    def to_json(self) -> dict[str, object]:
        return {
            "ap": self.ap,
            "map": self.map,
            "positives": self.positives,
            "num_images": self.num_images,
            "metric": "11point" if self.use_07_metric else "area",
        }


def evaluate_voc_cls(
    scores: Mapping[str, Mapping[str, float]] | np.ndarray,
    images: Sequence[VOCImage],
    use_07_metric: bool = True,
    classes: Sequence[str] = VOC_CLASSES,
) -> ClsEvaluation:
    """Classification AP of every class and the mAP.

    Args:
        scores: class name -> {image id -> score} (images missing score ``-inf``), or an
            ``np.ndarray[N, K]`` of scores in the order of ``images`` and ``classes``.
        images: the image set, in list order (ranking ties keep this order).
        classes: the VOC classes to score (all 20 by default, or a subset), in score-column order.

    Raises:
        DetectionsError: a class is missing, or a score names an image outside the set.
    """
    unknown = [name for name in classes if name not in VOC_CLASSES]
    if unknown:
        raise ValueError(f"not VOC classes: {unknown}")
    gt = voc_cls_ground_truth(images)[:, [VOC_CLASSES.index(name) for name in classes]]
    if isinstance(scores, np.ndarray):
        if scores.shape != gt.shape:
            raise ValueError(f"scores must be [{gt.shape[0]}, {gt.shape[1]}], got {scores.shape}")
        matrix = scores.astype(np.float64)
    else:
        matrix = _score_matrix(scores, [im.image_id for im in images], classes)
    per_class = {name: voc_cls_ap(matrix[:, k], gt[:, k], use_07_metric) for k, name in enumerate(classes)}
    positives = {name: int((gt[:, k] > 0).sum()) for k, name in enumerate(classes)}
    ap = {name: result[0] for name, result in per_class.items()}
    curves = {name: (result[1], result[2]) for name, result in per_class.items()}
    return ClsEvaluation(ap, positives, len(images), use_07_metric, curves)


def _score_matrix(scores: Mapping[str, Mapping[str, float]], ids: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    row = {image_id: i for i, image_id in enumerate(ids)}
    matrix = np.full((len(ids), len(classes)), -np.inf)
    missing = [name for name in classes if name not in scores]
    if missing:
        raise DetectionsError(f"no classification scores for class(es) {missing}")
    for k, name in enumerate(classes):
        for image_id, score in scores[name].items():
            if image_id not in row:  # VOCevalcls.m: error('unrecognized image "%s"')
                raise DetectionsError(f"class {name}: unrecognized image {image_id!r} (not in the image set)")
            matrix[row[image_id], k] = score
    return matrix


def write_cls_results(
    scores: np.ndarray, image_ids: Sequence[str], folder: Path, image_set: str,
    comp_id: str = "comp1", classes: Sequence[str] = VOC_CLASSES,
) -> list[Path]:
    """Write ``np.ndarray[N, K]`` scores as devkit files ``<comp>_cls_<set>_<class>.txt``
    (``<image_id> <score>`` lines, in ``image_ids`` order); returns the paths."""
    from spp_detect.stage_dir import atomic_write

    folder = Path(folder)
    paths = []
    for k, name in enumerate(classes):
        path = folder / f"{comp_id}_cls_{image_set}_{name}.txt"
        text = "".join(f"{i} {s:.6f}\n" for i, s in zip(image_ids, scores[:, k].tolist()))
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
        paths.append(path)
    return paths


def read_cls_results(
    folder: Path, image_set: str, comp_id: str | None = None, classes: Sequence[str] = VOC_CLASSES
) -> dict[str, dict[str, float]]:
    """Read devkit classification result files ``<comp>_cls_<set>_<class>.txt`` from ``folder``.

    Raises:
        DetectionsError: a class file is missing, ambiguous (several comp ids) or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DetectionsError(f"not a folder of classification result files: {folder}")
    out: dict[str, dict[str, float]] = {}
    for name in classes:
        pattern = f"{comp_id or '*'}_cls_{image_set}_{name}.txt"
        found = sorted(folder.glob(pattern))
        if len(found) != 1:
            what = "no file" if not found else f"{len(found)} files (pass --comp-id)"
            raise DetectionsError(f"{folder}: {what} matching {pattern}")
        scores: dict[str, float] = {}
        for number, line in enumerate(found[0].read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                scores[parts[0]] = float(parts[1])
            except ValueError:
                raise DetectionsError(f"{found[0]}:{number}: expected '<image_id> <score>', got {line!r}") from None
        out[name] = scores
    return out
