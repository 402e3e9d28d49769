"""spp-detect command line: one subcommand per pipeline stage.

Only this module knows about the command line. Each command parses its options, calls
one library function and prints a short summary. Heavy imports (torch, cv2, sklearn)
happen inside the commands so that ``spp-detect --help`` is instant.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from spp_detect import __version__

# Backbone names, kept here so --help does not import torch; tests check they match
# spp_detect.backbones.BACKBONES.
BACKBONE_NAMES = ("alexnet", "mobilenet_v2", "resnet50", "squeezenet1_0", "vgg16", "zf5")


# --------------------------------------------------------------------------- shared options
def voc_options(default_image_set: str | None = None):
    """``--voc-root``, ``--year``, ``--image-set``: which VOC images a stage reads."""

    def decorate(f):
        f = click.option(
            "--image-set",
            default=default_image_set,
            required=default_image_set is None,
            show_default=True,
            help="Image list under ImageSets/Main (train, val, trainval, test).",
        )(f)
        f = click.option("--year", default="2007", show_default=True, help="VOC year (folder VOC<year>).")(f)
        f = click.option(
            "--voc-root",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            required=True,
            envvar="SPP_DETECT_VOC_ROOT",
            help="VOCdevkit folder holding VOC<year>/ (env SPP_DETECT_VOC_ROOT).",
        )(f)
        return f

    return decorate


limit_option = click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Only the first N images of the image set (quick trials). Their files are the same as a full run's.",
)
force_option = click.option(
    "--force", is_flag=True, help="Recompute everything, even if a cache with other settings exists."
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
)
workers_option = click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Worker processes [default: CPU count]."
)


def backbone_options(f):
    """``--backbone``, ``--weights``, ``--input-norm``: the conv trunk and its weights."""
    f = click.option(
        "--input-norm",
        type=click.Choice(["auto", "torchvision", "caffe-bgr", "tf-rgb"]),
        default="auto",
        show_default=True,
        help="Input normalisation the weights expect. auto: torchvision's for --weights "
        "imagenet/none, the known convention for the files in shared/data/weights, "
        "else torchvision's.",
    )(f)
    f = click.option(
        "--weights",
        default="imagenet",
        show_default=True,
        help="'imagenet' (torchvision weights, downloaded), 'none' (random init) or a state_dict file.",
    )(f)
    f = click.option(
        "--backbone",
        type=click.Choice(BACKBONE_NAMES),
        default="squeezenet1_0",
        show_default=True,
        help="Conv trunk whose last map is pooled.",
    )(f)
    return f


def parse_scales(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """Callback for comma-separated scale lists like ``480,576,688,864,1200``."""
    try:
        scales = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise click.BadParameter(f"expected positive scales, got {value!r}")
    if len(set(scales)) != len(scales):
        raise click.BadParameter(f"scales repeat: {value!r}")
    return scales


# --------------------------------------------------------------------------- the group
@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="spp-detect")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """SPP-net object detection, stage by stage.

    \b
    The stages, each reading the previous one's output folder:
      1. proposals   selective search windows per image (or import R-CNN's .mat)
      2. extract     conv maps once per scale, windows assigned to scales, cached
      5. evaluate    VOC07 11-point AP (devkit-exact) / COCO metrics, PR curves
    Retrieval (R-MAC, AML, query expansion):
      index          descriptors and quantised maps of a folder of images
      search         ranked list for a query image (and box), --show PNG
      evaluate --retrieval paris6k --index DIR    Oxford/Paris mAP
    Tools:
      info           what a stage folder holds (settings, progress, recall, sizes)
      download-voc2007
    Every stage is resumable: rerun the same command to continue; a folder made
    with other settings is refused (naming them) unless you add --force.
    Run `spp-detect STAGE --help` for its options and an example.
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command("download-voc2007")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder to unpack into.")
def download_voc2007_cmd(out: Path) -> None:
    """Download PASCAL VOC2007 (trainval + test, ~900 MB) from the official site."""
    from spp_detect.datasets.download import download_voc2007

    devkit = download_voc2007(out)
    click.echo(f"VOC2007 ready: --voc-root {devkit}")


# --------------------------------------------------------------------------- proposals
def _not_required(*names: str):
    """Make options added by the decorators below this one optional (e.g. --voc-root)."""

    def decorate(f):
        for param in getattr(f, "__click_params__", []):
            if param.name in names:
                param.required = False
        return f

    return decorate


@main.command("proposals")
@_not_required("voc_root")
@voc_options(default_image_set="test")
@limit_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Proposals folder: manifest.json + one <image_id>.npy (float32 [N, 4], 0-based xyxy) per image.",
)
@click.option(
    "--mode",
    type=click.Choice(["fast", "quality", "rcnn"]),
    default="fast",
    help="fast / quality: OpenCV's selective search modes; rcnn: R-CNN's fast-mode colour "
    "spaces and k values (HSV+Lab, k=50,100) built from OpenCV parts.",
)
@click.option("--max-boxes", type=click.IntRange(min=1), default=2000, help="Keep the best-ranked N boxes per image (R-CNN: ~2000).")
@click.option("--min-size", type=click.IntRange(min=0), default=20, help="Drop boxes narrower or shorter than this, in pixels (R-CNN: 20).")
@click.option("--seed", type=int, default=0, help="Seed for OpenCV's random ranking, reset per image (results do not depend on order or --workers).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (counted in the summary) instead of stopping.")
@click.option(
    "--import",
    "import_file",
    type=click.Path(exists=True, path_type=Path),
    help="Fill --out from precomputed boxes instead: an R-CNN/Fast R-CNN selective-search .mat "
    "(images, boxes; 1-based y1 x1 y2 x2) or another proposals folder. No --voc-root needed.",
)
@click.option(
    "--export-mat",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Afterwards write --out as an R-CNN-style .mat (images, boxes; 1-based y1 x1 y2 x2). "
    "Alone with --out: export an existing folder.",
)
@workers_option
@force_option
@click.pass_context
def proposals_cmd(
    ctx: click.Context,
    voc_root: Path | None,
    year: str,
    image_set: str,
    limit: int | None,
    out: Path,
    mode: str,
    max_boxes: int,
    min_size: int,
    seed: int,
    skip_bad: bool,
    import_file: Path | None,
    export_mat: Path | None,
    workers: int | None,
    force: bool,
) -> None:
    """Selective search windows per image (stage 1), or import / export precomputed boxes.

    \b
    Compute (resumable; a rerun skips finished images, changed settings need --force):
      spp-detect proposals --voc-root VOCdevkit --image-set test --out props/test
    Import the standard R-CNN VOC07 boxes, or export yours to share them:
      spp-detect proposals --import selective_search_data/voc_2007_test.mat --out props/test
      spp-detect proposals --out props/test --export-mat voc_2007_test.mat
    """
    from click.core import ParameterSource

    from proposals.io import load_proposals, save_mat
    from proposals.run import BadImageError, ProposalSettings, import_proposals, run_proposals
    from spp_detect.datasets.voc import VOCFormatError, read_voc
    from spp_detect.stage_dir import SettingsChanged

    def on_command_line(name: str) -> bool:
        return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE

    search_options = ("voc_root", "limit", "mode", "max_boxes", "min_size", "seed", "skip_bad", "workers")
    image_ids = None
    try:
        if import_file is not None:
            clashing = [f"--{n.replace('_', '-')}" for n in search_options if on_command_line(n)]
            if clashing:
                raise click.UsageError(f"not used with --import (it stores the file's boxes as they are): {', '.join(clashing)}")
            summary = import_proposals(import_file, out, force=force)
            click.echo(f"imported {import_file}: {summary.describe()}")
        elif voc_root is not None:
            settings = ProposalSettings(mode=mode, min_size=min_size, max_boxes=max_boxes, seed=seed)
            images = read_voc(voc_root, image_set, year)[:limit]
            image_ids = [image.image_id for image in images]
            summary = run_proposals(
                images,
                out,
                settings,
                {"year": year, "image_set": image_set},
                workers=workers,
                force=force,
                skip_bad=skip_bad,
                progress=logging.getLogger().getEffectiveLevel() <= logging.INFO,  # hidden by -q
            )
            click.echo(summary.describe())
            for error in summary.bad:
                click.echo(f"  skipped {error}", err=True)
            if summary.bad:
                image_ids = [i for i in image_ids if i not in {e.image_id for e in summary.bad}]
        elif export_mat is None:
            raise click.UsageError("give --voc-root to compute proposals, --import FILE to import, or --export-mat FILE to export --out")
        if export_mat is not None:
            proposals = load_proposals(out, image_ids)
            save_mat(export_mat, proposals)
            click.echo(f"exported {len(proposals)} images to {export_mat}")
    except BadImageError as exc:
        raise click.ClickException(f"{exc}; fix or remove it, or rerun with --skip-bad to skip it") from exc
    except (SettingsChanged, VOCFormatError, FileNotFoundError, KeyError, ValueError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from exc


def parse_shard(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    """Callback for ``--shard K/N`` (1-based K)."""
    try:
        k, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected K/N such as 1/4, got {value!r}") from None
    if not 1 <= k <= n:
        raise click.BadParameter(f"need 1 <= K <= N, got {value!r}")
    return k, n


@main.command("extract")
@voc_options()
@limit_option
@click.option(
    "--proposals",
    "proposals_path",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="Output folder of `spp-detect proposals`, or an R-CNN selective-search .mat file.",
)
@backbone_options
@click.option(
    "--scales",
    default="480,576,688,864,1200",
    callback=parse_scales,
    help="Shorter-side scales (paper 4.1); '688' is the paper's 1-scale setting.",
)
@click.option(
    "--levels", default="1,2,3,6", callback=parse_scales, help="Pyramid levels, in feature order (paper: 1,2,3,6)."
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Cache folder.")
@device_option
@force_option
@click.option("--shard", default="1/1", callback=parse_shard, help="K/N: process every N-th image from the K-th.")
def extract_cmd(
    voc_root: Path,
    year: str,
    image_set: str,
    limit: int | None,
    proposals_path: Path,
    backbone: str,
    weights: str,
    input_norm: str,
    scales: tuple[int, ...],
    levels: tuple[int, ...],
    out: Path,
    device: str,
    force: bool,
    shard: tuple[int, int],
) -> None:
    """Conv maps once per scale per image, windows assigned to scales, cached.

    \b
    Every window (ground truth + proposals) goes to the scale where its area is
    closest to 224x224 and is mapped to that map's cells; the cache stores the
    fp16 conv maps (deflate-compressed) and pools on read. Rerun to resume; run
    several `--shard K/N` processes to fill one cache in parallel.

    \b
    Example:
      spp-detect extract --voc-root VOCdevkit --image-set test --proposals runs/ss-test \\
          --backbone squeezenet1_0 --weights squeezenet.pth --out runs/feat-test
    """
    from tqdm import tqdm

    from proposals.io import load_proposals
    from spp_detect.datasets.voc import VOCFormatError, read_voc
    from spp_detect.device import resolve_device
    from spp_detect.extract import ImageReadError, run_extract
    from spp_detect.stage_dir import SettingsChanged, source_key

    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise click.BadParameter(f"not 'imagenet', 'none' or an existing file: {weights}", param_hint="--weights")
    try:
        torch_device = resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    try:
        images = read_voc(voc_root, image_set, year)[:limit]
        boxes = load_proposals(proposals_path, [im.image_id for im in images])
        summary = run_extract(
            images,
            boxes,
            out,
            backbone=backbone,
            weights=weights,
            input_norm=input_norm,
            scales=scales,
            levels=levels,
            proposals_key=source_key(proposals_path),
            image_set=image_set,
            device=torch_device,
            force=force,
            shard=shard,
            progress=lambda todo: tqdm(todo, desc="extract", unit="img"),
        )
    except (VOCFormatError, SettingsChanged, ImageReadError, KeyError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None
    per_image = summary.bytes_written / max(summary.done, 1) / 1e6
    click.echo(
        f"extract: {summary.done} image(s) computed, {summary.skipped} already cached, "
        f"{summary.windows / max(summary.done, 1):.0f} windows/image, {per_image:.2f} MB/image, "
        f"{summary.images_per_second:.2f} img/s on {torch_device} -> {out}"
    )


@main.command("evaluate")
@click.option(
    "--voc2007",
    "protocol",
    flag_value="voc",
    default=True,
    show_default=False,
    help="VOC devkit AP per class and mAP (Python re-implementation of VOCevaldet.m; the default).",
)
@click.option(
    "--coco",
    "protocol",
    flag_value="coco",
    show_default=False,
    help="The 12 COCO numbers from pycocotools (VOC difficult objects as crowd/ignore regions).",
)
@click.option(
    "--retrieval",
    type=click.Choice(["paris6k"]),
    default=None,
    help="Retrieval mAP of an `spp-detect index` (Oxford/Paris compute_map protocol) instead of detection.",
)
@click.option(
    "--index", "index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
    help="With --retrieval: the index folder (of the dataset's jpg/ folder).",
)
@click.option(
    "--ground-truth", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="With --retrieval: gnd JSON  [default: gnd_paris6k_subset.json beside the indexed jpg/ folder]",
)
@click.option("--rerank", type=click.IntRange(min=1), default=100, help="With --retrieval: AML re-ranks the top N.")
@_not_required("voc_root")
@voc_options(default_image_set="test")
@click.option(
    "--detections",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Folder of devkit result files <comp>_det_<image-set>_<class>.txt (1-based "
    "'<image_id> <score> <x1> <y1> <x2> <y2>' lines), or a COCO results json.",
)
@click.option(
    "--metric",
    type=click.Choice(["11point", "area"]),
    default=None,
    show_default=False,
    help="VOC AP: 11point (VOC2007) or area (VOC2010+).  [default: 11point for --year < 2010, else area]",
)
@click.option(
    "--rule",
    type=click.Choice(["devkit", "py-faster-rcnn"]),
    default="devkit",
    help="VOC matching: the MATLAB devkit (IoU >= t, stable sort) or py-faster-rcnn's voc_eval.py "
    "(IoU > t, unstable sort, numpy's 11 thresholds).",
)
@click.option(
    "--iou-threshold",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.5,
    help="VOC match threshold (VOCopts.minoverlap).",
)
@click.option("--comp-id", default=None, help="Devkit file prefix, e.g. comp4  [default: any single match]")
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the results here."
)
@click.option(
    "--plots",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write pr_curves.png (one precision-recall curve per class) into this folder.",
)
@click.pass_context
def evaluate_cmd(
    ctx: click.Context,
    protocol: str,
    retrieval: str | None,
    index_dir: Path | None,
    ground_truth: Path | None,
    rerank: int,
    voc_root: Path | None,
    year: str,
    image_set: str,
    detections: Path | None,
    metric: str | None,
    rule: str,
    iou_threshold: float,
    comp_id: str | None,
    json_out: Path | None,
    plots: Path | None,
) -> None:
    """Score detections against VOC ground truth: devkit AP (--voc2007) or COCO metrics (--coco).

    \b
    spp-detect evaluate --voc2007 --voc-root R --image-set test --detections D \\
        [--metric 11point|area] [--rule devkit|py-faster-rcnn] [--json OUT] [--plots DIR]
    spp-detect evaluate --coco --voc-root R --image-set test --detections D [--json OUT]
    spp-detect evaluate --retrieval paris6k --index runs/paris-index [--rerank 100] [--json OUT]
    """
    import json

    from eval.results import DetectionsError, read_detections
    from spp_detect.datasets.voc import VOC_CLASSES, VOCFormatError, read_voc
    from spp_detect.stage_dir import atomic_write

    if retrieval is not None:
        summary = _evaluate_retrieval(index_dir, ground_truth, rerank)
        if json_out is not None:
            atomic_write(json_out, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, sort_keys=True)))
            click.echo(f"wrote {json_out}")
        return
    for name, value in (("--voc-root", voc_root), ("--detections", detections)):
        if value is None:
            raise click.UsageError(f"Missing option '{name}'.")
    if protocol == "coco":
        given = [
            f"--{name.replace('_', '-')}"
            for name in ("metric", "rule", "iou_threshold")
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        ]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply to --voc2007")
    try:
        images = read_voc(voc_root, image_set, year)
        dets = read_detections(detections, image_set, comp_id=comp_id)
    except (VOCFormatError, DetectionsError) as exc:
        raise click.ClickException(str(exc)) from None
    header = f"VOC{year} {image_set}, {len(images)} images, {sum(len(d) for d in dets.values())} detections"

    if protocol == "voc":
        from eval.voc import evaluate_voc

        if metric is None:
            if not year.isdigit():
                raise click.BadParameter(f"expected a year like 2007, got {year!r}", param_hint="--year")
            metric = "11point" if int(year) < 2010 else "area"
        try:
            result = evaluate_voc(
                dets, images, iou_threshold=iou_threshold, use_07_metric=metric == "11point", rule=rule
            )
        except DetectionsError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"{header}; {metric} AP, {rule} rule, IoU {iou_threshold:g}")
        click.echo("(Python re-implementation of the VOC devkit)")
        click.echo(f"{'class':<12} {'AP':>7} {'objects':>8} {'detections':>11}")
        for name in VOC_CLASSES:
            npos, count = result.per_class[name].npos, result.num_detections[name]
            click.echo(f"{name:<12} {result.ap[name]:>7.4f} {npos:>8d} {count:>11d}")
        click.echo(f"{'mAP':<12} {result.map:>7.4f}")
        summary = {"protocol": "voc", "year": year, "image_set": image_set,
                   "detections": str(detections), **result.to_json()}
        curves = {name: (r.rec, r.prec, r.ap) for name, r in result.per_class.items()}
        title = f"VOC{year} {image_set}: {metric} mAP {result.map:.4f} ({rule})"
    else:
        from eval.coco import evaluate_coco

        try:
            result = evaluate_coco(dets, images)
        except DetectionsError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"{header}; pycocotools COCOeval (bbox), difficult objects as crowd regions")
        click.echo(result.summary.rstrip())
        summary = {"protocol": "coco", "year": year, "image_set": image_set, "detections": str(detections),
                   **result.to_json()}
        curves = {name: (*result.curves[name], result.ap50[name]) for name in VOC_CLASSES}
        title = f"VOC{year} {image_set}: COCO AP50 per class (IoU 0.5, 101 recall points)"

    if json_out is not None:
        atomic_write(json_out, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, sort_keys=True)))
        click.echo(f"wrote {json_out}")
    if plots is not None:
        from eval.plots import plot_pr_curves

        path = plot_pr_curves(curves, plots / "pr_curves.png", title=title)
        click.echo(f"wrote {path}")


@main.command("info")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--voc-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    envvar="SPP_DETECT_VOC_ROOT",
    help="With a proposals folder: also report recall of the VOC ground truth.",
)
@click.option("--year", default="2007", show_default=True, help="VOC year (folder VOC<year>).")
@click.option("--image-set", default=None, help="Image list for recall [default: the folder's own].")
def info_cmd(folder: Path, voc_root: Path | None, year: str, image_set: str | None) -> None:
    """Summarise a stage folder: its settings, how far it got, and its numbers.

    \b
    proposals: boxes per image; with --voc-root, recall of non-difficult ground
               truth at IoU 0.5 / 0.7 for the first 100 ... 2000 boxes.
    extract:   windows per image, scale shares, feature size, cache MB per image.
    """
    import json

    from spp_detect.stage_dir import read_manifest

    try:
        manifest = read_manifest(folder)
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="FOLDER") from None
    stage, config = manifest.get("stage"), manifest.get("config", {})
    click.echo(f"{folder}: {stage} stage, key {manifest.get('key', '')[:12]}")
    click.echo("  settings: " + json.dumps(config, sort_keys=True))
    if stage == "proposals":
        import numpy as np

        from proposals.io import load_proposals
        from proposals.recall import proposal_recall
        from spp_detect.datasets.voc import read_voc

        proposals = load_proposals(folder)
        counts = [len(b) for b in proposals.values()]
        click.echo(f"  images: {len(proposals)}, boxes/image: {np.mean(counts) if counts else 0:.1f}")
        if voc_root is not None:
            name = image_set or config.get("dataset", {}).get("image_set", "test")
            images = [im for im in read_voc(voc_root, name, year) if im.image_id in proposals]
            table = proposal_recall(images, proposals)
            click.echo(f"  recall of {table['num_objects']} non-difficult objects in {len(images)} images:")
            for threshold, by_k in table["recall"].items():
                cells = "  ".join(f"top {k}: {r:.3f}" for k, r in by_k.items())
                click.echo(f"    {threshold}  {cells}")
    elif stage == "extract":
        from spp_detect.cache import FeatureCache

        stats = FeatureCache(folder).summary()
        shares = ", ".join(f"{s}: {100 * p:.0f}%" for s, p in zip(config["scales"], stats["scale_share"]))
        click.echo(
            f"  images: {stats['images']}, windows/image: {stats['windows_per_image']:.0f}, "
            f"cache: {stats['bytes_per_image'] / 1e6:.2f} MB/image"
        )
        click.echo(f"  feature: {stats['feature_dim']} numbers per window (levels {config['levels']})")
        click.echo(f"  windows per scale: {shares}")


# --------------------------------------------------------------------------- retrieval
def parse_bbox(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    """Callback for ``x1,y1,x2,y2`` query boxes (0-based pixels, as Oxford/Paris _query.txt)."""
    if value is None:
        return None
    try:
        box = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected x1,y1,x2,y2 numbers, got {value!r}") from None
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1] or min(box) < 0:
        raise click.BadParameter(f"expected x1,y1,x2,y2 with 0 <= x1 < x2 and 0 <= y1 < y2, got {value!r}")
    return box


def _index_trunk(index_dir: Path, device: str = "cpu"):
    """The loaded index, and the trunk + normalisation it was made with (weights checked)."""
    from spp_detect.backbones import build_trunk, resolve_normalization
    from spp_detect.device import resolve_device
    from spp_detect.extract import prepare_trunk
    from spp_detect.retrieval.index import load_index
    from spp_detect.stage_dir import source_key

    try:
        index = load_index(index_dir)
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="--index") from None
    weights = index.settings.get("weights", index.config["weights"])
    if weights not in ("imagenet", "none"):
        if not Path(weights).is_file() or source_key(Path(weights)) != index.config["weights"]:
            raise click.ClickException(f"the index was made with weights {weights} ({index.config['weights'][:20]}...), "
                                       "which are missing or changed")
    try:
        torch_device = resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    trunk = prepare_trunk(build_trunk(index.config["backbone"], weights), torch_device)
    norm = resolve_normalization(index.config["backbone"], weights, index.config["input_norm"])
    return index, trunk, norm


def _evaluate_retrieval(index_dir: Path | None, ground_truth: Path | None, rerank: int) -> dict:
    """`evaluate --retrieval paris6k`: mAP of the four methods, whitened; returns the JSON summary."""
    from tqdm import tqdm

    from eval.retrieval import load_paris_ground_truth, mean_average_precision
    from spp_detect.retrieval.search import METHODS, run_queries

    if index_dir is None:
        raise click.UsageError("--retrieval needs --index (the folder made by `spp-detect index`)")
    index, trunk, norm = _index_trunk(index_dir)
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
                           progress=lambda qs: tqdm(qs, desc="queries", unit="query"))
    click.echo(f"{len(queries)} queries on {len(index)} images, {index.config['backbone']}, whitened; "
               f"AML re-ranks the top {rerank}, QE averages the top 5")
    summary: dict = {"protocol": "retrieval", "dataset": "paris6k", "index": str(index_dir), "rerank": rerank,
                     "map": {}, "ap": {}}
    for method in METHODS:
        value, aps = mean_average_precision(rankings[method], queries)
        summary["map"][method] = value
        summary["ap"][method] = {q.name: float(a) for q, a in zip(queries, aps)}
        click.echo(f"{method:<12} mAP {100 * value:5.1f}")
    return summary


@main.command("index")
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Index folder.")
@backbone_options
@click.option(
    "--whiten-images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    envvar="SPP_DETECT_WHITEN_IMAGES",
    help="Folder of images of ANOTHER dataset to learn PCA-whitening on (e.g. VOC2007 JPEGImages; "
    "env SPP_DETECT_WHITEN_IMAGES).",
)
@click.option("--whiten-limit", type=click.IntRange(min=2), default=100, help="Use the first N whitening images.")
@click.option("--levels", type=click.IntRange(min=1), default=3, help="R-MAC region levels L (paper: 3).")
@limit_option
@device_option
@force_option
def index_cmd(
    images_dir: Path, out: Path, backbone: str, weights: str, input_norm: str, whiten_images: Path,
    whiten_limit: int, levels: int, limit: int | None, device: str, force: bool,
) -> None:
    """Describe a folder of images for retrieval: MAC, R-MAC region vectors, quantised maps.

    \b
    Each image runs once through the trunk at full resolution; its file holds the MAC,
    the L2-normalised MACs of the R-MAC regions (L levels, 40% overlap) and the map
    quantised to 0..8 for AML re-ranking. PCA-whitening is learned on --whiten-images,
    which must not be the searched set. Rerun to resume.

    \b
    Example:
      spp-detect index ../shared/data/paris6k-subset/jpg --out runs/paris-index \\
          --weights ../shared/data/weights/squeezenet1_0-imagenet-deepcompression.pth \\
          --whiten-images ../shared/data/voc2007-mini/VOC2007/JPEGImages
    """
    from tqdm import tqdm

    from spp_detect.device import resolve_device
    from spp_detect.extract import ImageReadError
    from spp_detect.retrieval.index import IndexSettings, list_images, run_index
    from spp_detect.stage_dir import SettingsChanged

    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise click.BadParameter(f"not 'imagenet', 'none' or an existing file: {weights}", param_hint="--weights")
    try:
        torch_device = resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    if images_dir.resolve() == whiten_images.resolve():
        raise click.BadParameter("whitening must be learned on another dataset than the indexed one",
                                 param_hint="--whiten-images")
    try:
        images = list_images(images_dir, limit)
        whiten = list_images(whiten_images)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    settings = IndexSettings(backbone=backbone, weights=weights, input_norm=input_norm, levels=levels,
                             whiten_limit=whiten_limit)
    try:
        summary = run_index(images, out, settings, whiten, device=torch_device, force=force,
                            progress=lambda seq, desc: tqdm(seq, desc=desc, unit="img"))
    except (SettingsChanged, ImageReadError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    per_image = summary.bytes_written / max(summary.done, 1) / 1e3
    click.echo(f"index: {summary.done} image(s) described, {summary.skipped} already indexed, "
               f"{per_image:.0f} kB/image, {summary.seconds:.1f} s -> {out}")


@main.command("search")
@click.option("--index", "index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder made by `spp-detect index`.")
@click.option("--query", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Query image.")
@click.option("--bbox", callback=parse_bbox, default=None,
              help="x1,y1,x2,y2: crop the query to this box first (0-based pixels).")
@click.option("--method", type=click.Choice(["rmac", "mac"]), default="rmac", help="First-search descriptor.")
@click.option("--whiten/--no-whiten", default=True, help="Use the index's PCA-whitening.")
@click.option("--rerank", type=click.IntRange(min=0), default=100, help="AML re-ranks the top N (0: off).")
@click.option("--qe", type=click.IntRange(min=0), default=0, help="Average query expansion with the top N (paper: 5).")
@click.option("--top", type=click.IntRange(min=1), default=10, help="Results to print (and draw).")
@click.option("--show", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: the query and the top results with their localised boxes.")
@device_option
def search_cmd(
    index_dir: Path, query: Path, bbox: tuple[float, ...] | None, method: str, whiten: bool, rerank: int, qe: int,
    top: int, show: Path | None, device: str,
) -> None:
    """Find the images of an index that show the query object.

    \b
    R-MAC (or MAC) ranks the whole index; AML then localises the query in the top
    --rerank images and re-scores each by the R-MAC of its box; --qe averages the
    query with its best localised results and scores them again.

    \b
    Example:
      spp-detect search --index runs/paris-index \\
          --query ../shared/data/paris6k-subset/jpg/paris_louvre_000136.jpg \\
          --bbox 14,76,989,564 --qe 5 --show louvre.png
    """
    from spp_detect.extract import ImageReadError, load_image_rgb
    from spp_detect.retrieval.descriptors import crop_query
    from spp_detect.retrieval.search import describe_query, search

    if qe and not rerank:
        raise click.UsageError("--qe uses the localised results: give --rerank > 0 too")
    index, trunk, norm = _index_trunk(index_dir, device)
    try:
        image = load_image_rgb(query)
        described = describe_query(trunk, norm, image, bbox, int(index.config["levels"]))
    except (ImageReadError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    result = search(index, described, method=method, whiten=whiten, rerank=min(rerank, len(index)), qe=qe)
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items())
    click.echo(f"{len(index)} images searched ({method}{', whitened' if whiten else ''}"
               f"{f', AML top {rerank}' if rerank else ''}{f', QE {qe}' if qe else ''}): {steps}")
    click.echo(f"{'rank':>4}  {'score':>7}  {'image':<32} box (x1,y1,x2,y2)")
    shown = []
    for rank, (i, score) in enumerate(zip(result.order[:top], result.scores[:top]), start=1):
        box = result.boxes.get(int(i))
        text = ",".join(f"{v:.0f}" for v in box) if box is not None else "-"
        click.echo(f"{rank:>4}  {score:>7.4f}  {index.names[i]:<32} {text}")
        shown.append((int(i), float(score), box))
    if show is not None:
        from spp_detect.retrieval.draw import draw_results

        panels = []
        for i, score, box in shown:
            path = index.image_path(i)
            panels.append((index.names[i], score, load_image_rgb(path) if path is not None else None, box))
        query_image = crop_query(image, bbox) if bbox is not None else image
        click.echo(f"wrote {draw_results(query_image, panels, show)}")


if __name__ == "__main__":
    main()
