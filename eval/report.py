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
               classes: Sequence[str] = VOC_CLASSES) -> Report:
    """Devkit detection AP (``VOCevaldet.m``, Python re-implementation) of a folder of
    devkit result files or a COCO results json, against ``images`` (``read_voc``, or any
    dataset's images whose labels index ``classes``; ``year`` ``""`` for a non-VOC one)."""
    from eval.results import read_detections
    from eval.voc import evaluate_voc

    metric = metric or default_metric(year)
    dets = read_detections(detections, image_set, comp_id=comp_id, classes=classes)
    result = evaluate_voc(dets, images, classes=classes, iou_threshold=iou_threshold, use_07_metric=metric == "11point",
                          rule=rule)
    lines = [f"{_header(year, image_set, images, dets)}; {metric} AP, {rule} rule, IoU {iou_threshold:g}",
             "(Python re-implementation of the VOC devkit)", f"{'class':<12} {'AP':>7} {'objects':>8} {'detections':>11}"]
    for name in classes:
        lines.append(f"{name:<12} {result.ap[name]:>7.4f} {result.per_class[name].npos:>8d} {result.num_detections[name]:>11d}")
    lines.append(f"{'mAP':<12} {result.map:>7.4f}")
    summary = {"protocol": "voc", "year": year, "image_set": image_set, "detections": str(detections), **result.to_json()}
    curves = {name: (r.rec, r.prec, r.ap) for name, r in result.per_class.items()}
    return Report(lines, summary, curves, f"{_name(year, image_set)}: {metric} mAP {result.map:.4f} ({rule})")


def coco_report(detections: Path, images: Sequence, *, year: str, image_set: str, comp_id: str | None = None,
                classes: Sequence[str] = VOC_CLASSES, coco_json: Path | None = None) -> Report:
    """pycocotools' 12 numbers, VOC difficult objects as crowd (ignore) regions; with
    ``coco_json``, against that COCO dataset file as it is (``evaluate_coco_json``)."""
    from eval.coco import evaluate_coco, evaluate_coco_json
    from eval.results import read_detections

    dets = read_detections(detections, image_set, comp_id=comp_id, classes=classes)
    result = evaluate_coco_json(dets, coco_json) if coco_json is not None else evaluate_coco(dets, images, classes)
    ground_truth = f"the ground truth of {coco_json}" if coco_json is not None else "difficult objects as crowd regions"
    lines = [f"{_header(year, image_set, images, dets)}; pycocotools COCOeval (bbox), {ground_truth}",
             result.summary.rstrip()]
    summary = {"protocol": "coco", "year": year, "image_set": image_set, "detections": str(detections), **result.to_json()}
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


def _header(year: str, image_set: str, images: Sequence, dets) -> str:
    return f"{_name(year, image_set)}, {len(images)} images, {sum(len(d) for d in dets.values())} detections"
