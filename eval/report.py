"""What ``spp-detect evaluate`` computes and reports, per protocol: the printed table, the
JSON summary and the precision-recall curves, so that the command only parses and prints.

The year -> AP metric rule lives here once (:func:`default_metric`): VOC2007 and earlier
use the 11-point AP, VOC2010 and later the area under the curve (the devkit's
``VOCevaldet.m``/``VOCevalcls.m``, ``VOCopts.year``-dependent).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spp_detect.datasets.voc import VOC_CLASSES

__all__ = ["Report", "default_metric", "voc_report", "coco_report", "voc_cls_report", "write_report"]


@dataclass
class Report:
    """``lines``: the table as printed; ``summary``: the JSON written by ``--json``;
    ``curves``: per class ``(recall, precision, ap)`` for ``--plots``; ``title`` of the plot."""

    lines: list[str]
    summary: dict[str, object]
    curves: dict[str, tuple] | None
    title: str


def default_metric(year: str) -> str:
    """``"11point"`` for VOC2007 and earlier, ``"area"`` for 2010 and later.

    Raises:
        ValueError: ``year`` is not a number.
    """
    if not str(year).isdigit():
        raise ValueError(f"expected a year like 2007, got {year!r}")
    return "11point" if int(year) < 2010 else "area"


def voc_report(detections: Path, images: Sequence, *, year: str, image_set: str, metric: str | None = None,
               rule: str = "devkit", iou_threshold: float = 0.5, comp_id: str | None = None,
               classes: Sequence[str] = VOC_CLASSES, result_ids=None, beyond_limit: Sequence[str] = (),
               untrained: Sequence[str] = ()) -> Report:
    """Devkit detection AP (``VOCevaldet.m``, Python re-implementation) of a folder of
    devkit result files or a COCO results json, against ``images`` (``read_voc``, or any
    dataset's images whose labels index ``classes``; ``year`` ``""`` for a non-VOC one).

    Args:
        result_ids: a COCO dataset's ids, to read a results json written in them.
        beyond_limit: ids of the dataset's images past ``--limit``: their detections are
            left out (and counted), where a detection of an image the dataset does not
            have at all is an error.
        untrained: classes the model had no training example of: marked in the table,
            and the mAP without them printed beside the devkit's.
    """
    from eval.results import read_detections
    from eval.voc import evaluate_voc

    metric = metric or default_metric(year)
    dets, left_out = _within(read_detections(detections, image_set, comp_id=comp_id, classes=classes,
                                             result_ids=result_ids), beyond_limit)
    result = evaluate_voc(dets, images, classes=classes, iou_threshold=iou_threshold, use_07_metric=metric == "11point",
                          rule=rule)
    lines = [f"{_header(year, image_set, images, dets, left_out)}; {metric} AP, {rule} rule, IoU {iou_threshold:g}",
             "(Python re-implementation of the VOC devkit)", f"{'class':<12} {'AP':>7} {'objects':>8} {'detections':>11}"]
    for name in classes:
        note = _class_note(name, result.per_class[name].npos, untrained)
        lines.append(f"{name:<12} {result.ap[name]:>7.4f} {result.per_class[name].npos:>8d} {result.num_detections[name]:>11d}"
                     + (f"  {note}" if note else ""))
    lines.append(f"{'mAP':<12} {result.map:>7.4f}")
    lines += _map_notes(result.ap, untrained, "mAP")
    summary = {"protocol": "voc", "year": year, "image_set": image_set, "detections": str(detections), **result.to_json(),
               **_class_summary(result.ap, untrained), "images_without_detections": _without_detections(images, dets),
               "detections_left_out": left_out}
    curves = {name: (r.rec, r.prec, r.ap) for name, r in result.per_class.items()}
    return Report(lines, summary, curves, f"{_name(year, image_set)}: {metric} mAP {result.map:.4f} ({rule})")


def coco_report(detections: Path, images: Sequence, *, year: str, image_set: str, comp_id: str | None = None,
                classes: Sequence[str] = VOC_CLASSES, coco_json: Path | None = None, result_ids=None,
                beyond_limit: Sequence[str] = (), untrained: Sequence[str] = ()) -> Report:
    """pycocotools' 12 numbers, VOC difficult objects as crowd (ignore) regions; with
    ``coco_json``, against that COCO dataset file as it is (``evaluate_coco_json``), only
    on ``images`` (pycocotools' ``params.imgIds``: the first N with ``--limit N``).
    ``result_ids``, ``beyond_limit``, ``untrained``: as :func:`voc_report`'s."""
    from eval.coco import evaluate_coco, evaluate_coco_json
    from eval.results import read_detections

    dets, left_out = _within(read_detections(detections, image_set, comp_id=comp_id, classes=classes,
                                             result_ids=result_ids), beyond_limit)
    if coco_json is not None:
        result = evaluate_coco_json(dets, coco_json, image_ids=[im.image_id for im in images])
    else:
        result = evaluate_coco(dets, images, classes)
    ground_truth = f"the ground truth of {coco_json}" if coco_json is not None else "difficult objects as crowd regions"
    lines = [f"{_header(year, image_set, images, dets, left_out)}; pycocotools COCOeval (bbox), {ground_truth}",
             result.summary.rstrip()]
    for name in (n for n in classes if n in untrained):  # (the classes without test objects: under the mean)
        lines.append(f"  {name}: {_class_note(name, int(result.ap[name] == result.ap[name]), untrained)}")  # NaN: none
    lines += _map_notes(result.ap, untrained, "AP")
    summary = {"protocol": "coco", "year": year, "image_set": image_set, "detections": str(detections), **result.to_json(),
               **_class_summary(result.ap, untrained), "images_without_detections": _without_detections(images, dets),
               "detections_left_out": left_out, "num_images": len(images)}
    curves = {name: (*result.curves[name], result.ap50[name]) for name in classes}
    return Report(lines, summary, curves, f"{_name(year, image_set)}: COCO AP50 per class (IoU 0.5, 101 recall points)")


def voc_cls_report(scores: Path, images: Sequence, *, year: str, image_set: str, metric: str | None = None,
                   comp_id: str | None = None) -> Report:
    """Devkit classification AP (``VOCevalcls.m``) of a folder of score files."""
    from eval.voc_cls import evaluate_voc_cls, read_cls_results

    metric = metric or default_metric(year)
    result = evaluate_voc_cls(read_cls_results(scores, image_set, comp_id), images, use_07_metric=metric == "11point")
    lines = [f"VOC{year} {image_set}, {len(images)} images; classification {metric} AP (Python VOCevalcls.m)",
             f"{'class':<12} {'AP':>7} {'positives':>10}"]
    lines += [f"{name:<12} {result.ap[name]:>7.4f} {result.positives[name]:>10d}" for name in VOC_CLASSES]
    lines.append(f"{'mAP':<12} {result.map:>7.4f}")
    summary = {"protocol": "voc-cls", "year": year, "image_set": image_set, "scores": str(scores), **result.to_json()}
    curves = {name: (*result.curves[name], result.ap[name]) for name in VOC_CLASSES}
    return Report(lines, summary, curves, f"VOC{year} {image_set} classification: mAP {result.map:.4f}")


def write_report(report: Report, json_out: Path | None = None, plots: Path | None = None) -> list[Path]:
    """Write the JSON summary (atomically) and ``pr_curves.png`` where asked; returns the paths."""
    from spp_detect.stage_dir import atomic_write

    written = []
    if json_out is not None:
        atomic_write(json_out, lambda tmp: tmp.write_text(json.dumps(report.summary, indent=2, sort_keys=True)))
        written.append(Path(json_out))
    if plots is not None and report.curves is not None:
        from eval.plots import plot_pr_curves

        written.append(plot_pr_curves(report.curves, Path(plots) / "pr_curves.png", title=report.title))
    return written


def _name(year: str, image_set: str) -> str:
    """``VOC2007 test``, or the dataset's own name where there is no VOC year."""
    return f"VOC{year} {image_set}" if year else image_set


def _header(year: str, image_set: str, images: Sequence, dets, left_out: int = 0) -> str:
    """``<set>, N images (K without detections), D detections[, L of images past --limit left out]``."""
    without = _without_detections(images, dets)
    past = f" ({left_out} more, of images past --limit, left out)" if left_out else ""
    return (f"{_name(year, image_set)}, {len(images)} images ({without} without detections), "
            f"{sum(len(d) for d in dets.values())} detections{past}")


def _within(dets: dict, beyond_limit: Sequence[str]) -> tuple[dict, int]:
    """``(dets without those of the images beyond_limit, how many were left out)``."""
    if not beyond_limit:
        return dets, 0
    from eval.results import ClassDetections

    past = set(beyond_limit)
    kept, left_out = {}, 0
    for name, d in dets.items():
        mine = ~np.isin(d.image_ids, list(past))
        kept[name] = ClassDetections(d.image_ids[mine], d.scores[mine], d.boxes[mine])
        left_out += int((~mine).sum())
    return kept, left_out


def _without_detections(images: Sequence, dets: dict) -> int:
    """How many of ``images`` have no detection of any class."""
    seen = set().union(*(set(d.image_ids.tolist()) for d in dets.values())) if dets else set()
    return sum(im.image_id not in seen for im in images)


def _class_note(name: str, objects: int, untrained: Sequence[str]) -> str:
    """What the table says beside a class's AP: no training examples, no test objects, both."""
    parts = ["no training examples"] if name in untrained else []
    if not objects:
        parts.append("no test objects: left out of the mean")
    elif parts:
        parts.append("counted in the mean (never detected: AP 0)")
    return "; ".join(parts)


def _map_notes(ap: dict[str, float], untrained: Sequence[str], what: str) -> list[str]:
    """Lines under the mean: which classes it leaves out (no test objects) and, if some
    class had no training examples, the mean without those too."""
    undefined = [n for n, v in ap.items() if v != v]
    lines = []
    if undefined:
        lines.append(f"  {what} over {len(ap) - len(undefined)} of {len(ap)} classes: no test objects of "
                     f"{', '.join(undefined)}")
    counted = [n for n in untrained if n in ap and ap[n] == ap[n]]
    if counted:
        trained = [v for n, v in ap.items() if v == v and n not in untrained]
        value = f"{np.mean(trained):.4f}" if trained else "undefined"
        lines.append(f"  {what} counts {len(counted)} class(es) with no training examples ({', '.join(counted)}); "
                     f"over the {len(trained)} trained classes with test objects: {value}")
    return lines


def _class_summary(ap: dict[str, float], untrained: Sequence[str]) -> dict:
    """JSON fields: ``untrained_classes`` and ``map_trained`` (mean AP over the other
    classes with test objects; ``None`` if there is none)."""
    trained = [v for n, v in ap.items() if v == v and n not in untrained]
    return {"untrained_classes": [n for n in ap if n in untrained],
            "map_trained": float(np.mean(trained)) if trained else None}
