"""evaluate: detection AP (VOC devkit, COCO), classification AP, retrieval mAP."""

from __future__ import annotations

from pathlib import Path

import click

from spp_detect.commands.options import (
    IN_DIR, IN_FILE, IN_PATH, OUT_DIR, OUT_FILE, bar, dataset_options, open_dataset_or_usage_error, stage_errors,
)
from spp_detect.commands.retrieval import open_index_trunk


@click.command("evaluate")
@click.option("--voc2007", "protocol", flag_value="voc", default=True, show_default=False,
              help="VOC devkit AP per class and mAP (Python re-implementation of VOCevaldet.m; the default).")
@click.option("--coco", "protocol", flag_value="coco", show_default=False,
              help="The 12 COCO numbers from pycocotools (VOC difficult objects as crowd/ignore regions).")
@click.option("--voc2007-cls", "protocol", flag_value="voc-cls", show_default=False,
              help="Image classification AP per class and mAP (VOCevalcls.m) of --scores.")
@click.option("--scores", type=IN_DIR, default=None, help="With --voc2007-cls: folder of devkit files "
              "<comp>_cls_<image-set>_<class>.txt ('<image_id> <score>' lines).")
@click.option("--retrieval", type=click.Choice(["paris6k"]), default=None,
              help="Retrieval mAP of an `spp-detect index` (Oxford/Paris compute_map protocol) instead of detection.")
@click.option("--index", "index_dir", type=IN_DIR, default=None, help="With --retrieval: the index folder (of the dataset's jpg/ folder).")
@click.option("--ground-truth", type=IN_FILE, default=None,
              help="With --retrieval: gnd JSON  [default: gnd_paris6k_subset.json beside the indexed jpg/ folder]")
@click.option("--rerank", type=click.IntRange(min=1), default=100, help="With --retrieval: AML re-ranks the top N.")
@dataset_options(default_image_set="test")
@click.option("--detections", type=IN_PATH, default=None, help="Folder of devkit result files <comp>_det_<image-set>_<class>.txt "
              "(1-based '<image_id> <score> <x1> <y1> <x2> <y2>' lines), or a COCO results json.")
@click.option("--metric", type=click.Choice(["11point", "area"]), default=None, show_default=False,
              help="VOC AP: 11point (VOC2007) or area (VOC2010+).  [default: 11point for --year < 2010, else area]")
@click.option("--rule", type=click.Choice(["devkit", "py-faster-rcnn"]), default="devkit", help="VOC matching: the MATLAB "
              "devkit (IoU >= t, stable sort) or py-faster-rcnn's voc_eval.py (IoU > t, unstable sort, numpy's 11 thresholds).")
@click.option("--iou-threshold", type=click.FloatRange(0, 1, min_open=True), default=0.5, help="VOC match threshold (VOCopts.minoverlap).")
@click.option("--comp-id", default=None, help="Devkit file prefix, e.g. comp4  [default: any single match]")
@click.option("--json", "json_out", type=OUT_FILE, default=None, help="Write the results here.")
@click.option("--plots", type=OUT_DIR, default=None, help="Write pr_curves.png (one precision-recall curve per class) into this folder.")
@click.pass_context
def evaluate_cmd(ctx: click.Context, protocol: str, retrieval: str | None, index_dir: Path | None, ground_truth: Path | None,
                 rerank: int, json_out: Path | None, plots: Path | None, **params) -> None:
    """Score detections against VOC ground truth: devkit AP (--voc2007) or COCO metrics (--coco).

    \b
    spp-detect evaluate --voc-root R --image-set test --detections D [--metric area] [--json OUT] [--plots DIR]
    spp-detect evaluate --coco --coco-json instances_val.json --images DIR --detections D
    spp-detect evaluate --voc2007-cls --voc-root R --image-set test --scores S
    spp-detect evaluate --retrieval paris6k --index runs/paris-index [--rerank 100]
    """
    from eval.report import write_report

    if retrieval is not None:
        report = retrieval_report(index_dir, ground_truth, rerank)
    else:
        report = ground_truth_report(ctx, protocol, **params)
    for line in report.lines:
        click.echo(line)
    with stage_errors():
        for path in write_report(report, json_out, plots):
            click.echo(f"wrote {path}")


def ground_truth_report(ctx: click.Context, protocol: str, voc_root: Path | None, year: str, image_set: str,
                        coco_json: Path | None, image_paths: tuple[Path, ...], limit: int | None, detections: Path | None,
                        metric: str | None, rule: str, iou_threshold: float, comp_id: str | None, scores: Path | None):
    """`evaluate --voc2007 / --coco / --voc2007-cls`: detections (or scores) against the dataset's ground truth."""
    from eval.report import coco_report, voc_cls_report, voc_report
    from eval.results import check_detections_classes, detections_info

    _check_protocol_options(ctx, protocol, voc_root or coco_json or (image_paths or None), detections, scores)
    with stage_errors():
        data = open_dataset_or_usage_error(voc_root, image_set, year, coco_json, image_paths, limit)
        if not data.annotated or (protocol == "voc-cls" and data.kind != "voc"):
            raise click.UsageError("evaluate needs ground truth: --voc-root, or --coco-json with --images "
                                   "(--voc2007-cls: --voc-root)")
        images, name, voc_year = data.images, data.name, data.year or ""
        if detections is not None:
            check_detections_classes(detections, data.classes)
            # detections of the images past --limit are left out; the classes the model never saw are marked
            scope = {"result_ids": data.result_ids, "beyond_limit": data.beyond_limit,
                     "untrained": list(detections_info(detections).get("untrained_classes") or [])}
        if protocol == "voc":  # a COCO dataset: the --voc2007 (11-point) AP unless --metric says otherwise
            return voc_report(detections, images, year=voc_year, image_set=name, rule=rule,
                              metric=metric or (None if voc_year else "11point"),
                              iou_threshold=iou_threshold, comp_id=comp_id, classes=data.classes, **scope)
        if protocol == "coco":
            return coco_report(detections, images, year=voc_year, image_set=name, comp_id=comp_id,
                               classes=data.classes, coco_json=data.coco_json, **scope)
        return voc_cls_report(scores, images, year=year, image_set=image_set, metric=metric, comp_id=comp_id)


def _check_protocol_options(ctx: click.Context, protocol: str, voc_root, detections, scores) -> None:
    """Usage errors: a missing input, or options of another protocol given."""
    needed = {"voc": ("--detections", detections), "coco": ("--detections", detections), "voc-cls": ("--scores", scores)}
    for name, value in (("--voc-root", voc_root), needed[protocol]):
        if value is None:
            raise click.UsageError(f"Missing option '{name}'.")
    foreign = {"voc": (), "coco": ("metric", "rule", "iou_threshold"), "voc-cls": ("detections", "rule", "iou_threshold")}
    given = [f"--{n.replace('_', '-')}" for n in foreign[protocol]
             if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if given:
        scope = "only apply to --voc2007" if protocol == "coco" else "do not apply to --voc2007-cls"
        raise click.UsageError(f"{', '.join(given)} {scope}")


def retrieval_report(index_dir: Path | None, ground_truth: Path | None, rerank: int):
    """`evaluate --retrieval paris6k`: mAP of the four methods, whitened, as a report."""

    from eval.report import Report
    from eval.retrieval import load_paris_ground_truth, mean_average_precision
    from spp_detect.retrieval.search import METHODS, run_queries

    if index_dir is None:
        raise click.UsageError("--retrieval needs --index (the folder made by `spp-detect index`)")
    index, trunk, norm = open_index_trunk(index_dir)
    images = Path(index.settings.get("images") or ".")
    if ground_truth is None:
        ground_truth = images.parent / "gnd_paris6k_subset.json"
        if not ground_truth.is_file():
            raise click.BadParameter(f"no {ground_truth.name} beside {images}; pass it", param_hint="--ground-truth")
    try:
        queries = load_paris_ground_truth(ground_truth, index.names)
    except ValueError as exc:
        raise click.ClickException(f"{ground_truth}: {exc}") from None
    paths = [(images / f"{q.image}.jpg", q.box) for q in queries]
    rankings = run_queries(index, trunk, norm, paths, rerank=rerank, qe=5,
                           progress=bar("query"))
    lines = [f"{len(queries)} queries on {len(index)} images, {index.config['backbone']}, whitened; "
             f"AML re-ranks the top {rerank}, QE averages the top 5"]
    summary: dict = {"protocol": "retrieval", "dataset": "paris6k", "index": str(index_dir), "rerank": rerank,
                     "map": {}, "ap": {}}
    for method in METHODS:
        value, aps = mean_average_precision(rankings[method], queries)
        summary["map"][method] = value
        summary["ap"][method] = {q.name: float(a) for q, a in zip(queries, aps)}
        lines.append(f"{method:<12} mAP {100 * value:5.1f}")
    return Report(lines, summary, None, "")


#: registered on the group by cli.py, in this order
COMMANDS = (evaluate_cmd,)
