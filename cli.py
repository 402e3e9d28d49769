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
    what = param.name if param is not None and param.name else "scales"
    try:
        scales = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise click.BadParameter(f"expected positive {what}, got {value!r}")
    if len(set(scales)) != len(scales):
        raise click.BadParameter(f"{what} repeat: {value!r}")
    return scales


def read_voc_or_usage_error(voc_root: Path, image_set: str, year: str, limit: int | None = None, bad: list | None = None):
    """``read_voc``, turning a missing image-set list (a bad --image-set / --year) into a usage error."""
    from spp_detect.datasets.voc import VOCFormatError, read_voc

    try:
        return read_voc(voc_root, image_set, year, bad=bad, limit=limit)
    except VOCFormatError as exc:
        if exc.image_id is None and str(exc).startswith("image-set list not found"):
            raise click.BadParameter(str(exc), param_hint="'--image-set' / '--year'") from None
        raise


def message(exc: BaseException) -> str:
    """An exception's text for the command line (a KeyError's without the quotes repr adds)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def write_error(exc: OSError) -> click.ClickException:
    """One line for a failed write (a full disk, no permission); finished files are kept."""
    import errno

    text = str(exc) if exc.filename is None else f"cannot write {exc.filename}: {exc.strerror}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        text += "; free some space and rerun the same command (finished files are kept and reused)"
    return click.ClickException(text)


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
@click.option(
    "--max-pixels",
    type=click.IntRange(min=10_000),
    default=1_000_000,
    help="Search larger images on a copy shrunk to this many pixels (boxes scaled back); bounds memory and time.",
)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Skip images that are missing, unreadable or badly annotated (counted and listed in the summary) instead of stopping.",
)
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
    max_pixels: int,
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
    from spp_detect.datasets.voc import VOCFormatError
    from spp_detect.stage_dir import SettingsChanged

    def on_command_line(name: str) -> bool:
        return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE

    search_options = ("voc_root", "limit", "mode", "max_boxes", "min_size", "seed", "max_pixels", "skip_bad", "workers")
    image_ids = None
    try:
        if import_file is not None:
            clashing = [f"--{n.replace('_', '-')}" for n in search_options if on_command_line(n)]
            if clashing:
                raise click.UsageError(f"not used with --import (it stores the file's boxes as they are): {', '.join(clashing)}")
            summary = import_proposals(import_file, out, force=force)
            click.echo(f"imported {import_file}: {summary.describe()}")
        elif voc_root is not None:
            settings = ProposalSettings(mode=mode, min_size=min_size, max_boxes=max_boxes, seed=seed, max_pixels=max_pixels)
            voc_bad: list[VOCFormatError] | None = [] if skip_bad else None
            images = read_voc_or_usage_error(voc_root, image_set, year, limit, voc_bad)
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
            summary.bad[:0] = voc_bad or []
            summary.images += len(voc_bad or [])
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
    except (BadImageError, VOCFormatError) as exc:
        raise click.ClickException(f"{exc}; fix or remove it, or rerun with --skip-bad to skip it") from None
    except (SettingsChanged, FileNotFoundError, KeyError, ValueError) as exc:
        raise click.ClickException(message(exc)) from None
    except OSError as exc:
        raise write_error(exc) from None


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
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Skip images that are missing, unreadable, badly annotated or without usable proposals "
    "(counted and listed in the summary) instead of stopping.",
)
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
    skip_bad: bool,
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
    from spp_detect.datasets.voc import VOCFormatError
    from spp_detect.device import resolve_device
    from spp_detect.extract import BadSetting, ImageReadError, run_extract
    from spp_detect.stage_dir import SettingsChanged, source_key

    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise click.BadParameter(f"not 'imagenet', 'none' or an existing file: {weights}", param_hint="--weights")
    try:
        torch_device = resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    bad: list[Exception] | None = [] if skip_bad else None
    try:
        images = read_voc_or_usage_error(voc_root, image_set, year, limit, bad)
        boxes = load_proposals(proposals_path, [im.image_id for im in images], bad=bad)
        if bad:
            images = [im for im in images if im.image_id in boxes]
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
            skip_bad=skip_bad,
        )
    except BadSetting as exc:
        raise click.BadParameter(str(exc), param_hint=f"--{exc.setting}") from None
    except (VOCFormatError, ImageReadError) as exc:
        raise click.ClickException(f"{exc}; fix or remove it, or rerun with --skip-bad to skip it") from None
    except (SettingsChanged, KeyError, ValueError, RuntimeError) as exc:
        raise click.ClickException(message(exc)) from None
    except OSError as exc:
        raise write_error(exc) from None
    summary.bad[:0] = bad or []
    for error in summary.bad:
        click.echo(f"  skipped {message(error)}", err=True)
    per_image = summary.bytes_written / max(summary.done, 1) / 1e6
    redone = f", {summary.redone} damaged file(s) redone" if summary.redone else ""
    click.echo(
        f"extract: {summary.done} image(s) computed, {summary.skipped} already cached, {len(summary.bad)} bad{redone}, "
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
@voc_options(default_image_set="test")
@click.option(
    "--detections",
    type=click.Path(exists=True, path_type=Path),
    required=True,
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
    voc_root: Path,
    year: str,
    image_set: str,
    detections: Path,
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
    """
    import json

    from eval.results import DetectionsError, read_detections
    from spp_detect.datasets.voc import VOC_CLASSES, VOCFormatError
    from spp_detect.stage_dir import atomic_write

    if protocol == "coco":
        given = [
            f"--{name.replace('_', '-')}"
            for name in ("metric", "rule", "iou_threshold")
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        ]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply to --voc2007")
    try:
        images = read_voc_or_usage_error(voc_root, image_set, year)
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
        try:
            atomic_write(json_out, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, sort_keys=True)))
        except OSError as exc:
            raise write_error(exc) from None
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
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    stage, config = manifest.get("stage"), manifest.get("config", {})
    click.echo(f"{folder}: {stage} stage, key {manifest.get('key', '')[:12]}")
    click.echo("  settings: " + json.dumps(config, sort_keys=True))
    if stage == "proposals":
        import numpy as np

        from proposals.io import load_proposals
        from proposals.recall import proposal_recall

        damaged: list = []
        proposals = load_proposals(folder, bad=damaged)
        counts = [len(b) for b in proposals.values()]
        click.echo(f"  images: {len(proposals)}, boxes/image: {np.mean(counts) if counts else 0:.1f}")
        for error in damaged:
            click.echo(f"  unusable: {error}")
        if voc_root is not None:
            name = image_set or config.get("dataset", {}).get("image_set", "test")
            images = [im for im in read_voc_or_usage_error(voc_root, name, year) if im.image_id in proposals]
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
        for line in stats["damaged"]:
            click.echo(f"  damaged (rerun extract to redo it): {line}")


if __name__ == "__main__":
    main()
