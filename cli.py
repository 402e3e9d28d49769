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
    help="auto (CUDA when present, else CPU; cuda:LOCAL_RANK under torchrun / srun), cpu, cuda or cuda:N.",
)
workers_option = click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Worker processes [default: CPU count]."
)


def _check_shard(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from spp_detect.distributed import parse_shard

    try:
        parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


shard_option = click.option(
    "--shard",
    default="auto",
    callback=_check_shard,
    help="K/N: this process takes every N-th image from the K-th, into the same --out. auto: "
    "from torchrun (RANK/WORLD_SIZE) or srun (SLURM_PROCID/SLURM_NTASKS) when launched by one, "
    "else 1/1. See docs/scaling.md.",
)


def _launch():
    """This process's place in a torchrun / srun job (spp_detect.distributed)."""
    from spp_detect.distributed import launch_from_env

    try:
        return launch_from_env()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def _process_device(device: str, launch):
    from spp_detect.distributed import process_device

    try:
        return process_device(device, launch)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None


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
      3. finetune    fc6 -> fc7 -> fc8 on pooled features (no conv layer runs)
      4. train-svm   linear SVMs with hard-negative mining (+ box regression)
      5. detect      score windows, NMS; VOC comp4 files and COCO json
      6. evaluate    VOC07 11-point AP (devkit-exact) / COCO metrics, PR curves
    Image classification (paper section 3):
      classify-features, train-classifier   whole-image SPP features, linear SVMs
      train-spp-classifier                  SPP classifier trained end to end
      evaluate --voc2007-cls                devkit classification AP
    Retrieval (R-MAC, AML, query expansion):
      index          descriptors and quantised maps of a folder of images
      search         ranked list for a query image (and box), --show PNG
      evaluate --retrieval paris6k --index DIR    Oxford/Paris mAP
    Tools:
      calibrate      per-class score calibration of a model, for combine
      combine        union of several models' detections, then NMS (paper 4.4)
      show           detections drawn on an image
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
    type=click.Choice(["fast", "opencv-fast", "opencv-quality"]),
    default="fast",
    help="fast: selective search's fast mode as the paper and R-CNN ran it (HSV+Lab, "
    "k=50,100; 95% recall on VOC07 test). opencv-fast / opencv-quality: OpenCV's own modes "
    "(k=150..450: 93.5% recall at the same speed; quality: ~3.5x slower).",
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
@shard_option
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
    shard: str,
) -> None:
    """Selective search windows per image (stage 1), or import / export precomputed boxes.

    \b
    Compute (resumable; a rerun skips finished images, changed settings need --force):
      spp-detect proposals --voc-root VOCdevkit --image-set test --out props/test
    Import the standard R-CNN VOC07 boxes, or export yours to share them:
      spp-detect proposals --import selective_search_data/voc_2007_test.mat --out props/test
      spp-detect proposals --out props/test --export-mat voc_2007_test.mat
    Several processes (machines) fill one folder, each a shard of the images:
      torchrun --nproc-per-node 4 --no-python spp-detect proposals --voc-root VOCdevkit --out props/test
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
            import os

            from spp_detect.distributed import resolve_shard

            launch = _launch()
            shard_kn = resolve_shard(shard, launch)
            if export_mat is not None and shard_kn[1] > 1:
                raise click.UsageError("--export-mat needs every shard's boxes: export once the job is done "
                                       "(spp-detect proposals --out DIR --export-mat FILE, one process)")
            if workers is None and launch.world_size > 1:  # share this machine's CPUs among its processes
                cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                workers = max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
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
                shard=shard_kn,
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
@click.option(
    "--mode",
    type=click.Choice(["spp", "crop-warp"]),
    default="spp",
    help="spp: the paper (conv maps once per scale, windows pooled from them). crop-warp: "
    "R-CNN's baseline, every window cropped with 16 px context, warped to 224 and run through "
    "the trunk alone (its map pooled whole with the same pyramid; --scales is ignored). "
    "Slow by design: for comparisons.",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Cache folder.")
@device_option
@force_option
@shard_option
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
    mode: str,
    out: Path,
    device: str,
    force: bool,
    shard: str,
    skip_bad: bool,
) -> None:
    """Conv maps once per scale per image, windows assigned to scales, cached.

    \b
    Every window (ground truth + proposals) goes to the scale where its area is
    closest to 224x224 and is mapped to that map's cells; the cache stores the
    fp16 conv maps (deflate-compressed) and pools on read. Rerun to resume.
    Under torchrun or srun each process takes its shard of the images (and
    GPU LOCAL_RANK); or run `--shard K/N` processes by hand (docs/scaling.md).

    \b
    Example:
      spp-detect extract --voc-root VOCdevkit --image-set test --proposals runs/ss-test \\
          --backbone squeezenet1_0 --weights squeezenet.pth --out runs/feat-test
      torchrun --nproc-per-node 4 --no-python spp-detect extract --voc-root VOCdevkit \\
          --image-set test --proposals runs/ss-test --out runs/feat-test
    """
    from tqdm import tqdm

    from proposals.io import load_proposals
    from spp_detect.datasets.voc import VOCFormatError
    from spp_detect.distributed import resolve_shard
    from spp_detect.extract import BadSetting, ExtractSettings, ImageReadError, run_extract
    from spp_detect.stage_dir import SettingsChanged, source_key

    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise click.BadParameter(f"not 'imagenet', 'none' or an existing file: {weights}", param_hint="--weights")
    launch = _launch()
    shard_kn = resolve_shard(shard, launch)
    torch_device = _process_device(device, launch)
    bad: list[Exception] | None = [] if skip_bad else None
    try:
        settings = ExtractSettings(
            backbone=backbone, weights=weights, input_norm=input_norm, scales=scales, levels=levels, mode=mode
        )
        images = read_voc_or_usage_error(voc_root, image_set, year, limit, bad)
        boxes = load_proposals(proposals_path, [im.image_id for im in images], bad=bad)
        if bad:
            images = [im for im in images if im.image_id in boxes]
        summary = run_extract(
            images,
            boxes,
            out,
            settings,
            proposals_key=source_key(proposals_path),
            image_set=image_set,
            device=torch_device,
            force=force,
            shard=shard_kn,
            progress=lambda todo: tqdm(todo, desc="extract" if shard_kn[1] == 1 else f"extract {shard_kn[0]}/{shard_kn[1]}",
                                       unit="img", position=shard_kn[0] - 1 if launch.world_size > 1 else None,
                                       disable=logging.getLogger().getEffectiveLevel() > logging.INFO),  # -q hides it
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
    where = "" if shard_kn[1] == 1 and launch.launcher == "none" else f" [{_shard_label(shard_kn, launch)}]"
    click.echo(
        f"extract{where}: {summary.done} image(s) computed, {summary.skipped} already cached, {len(summary.bad)} bad{redone}, "
        f"{summary.windows / max(summary.done, 1):.0f} windows/image, {per_image:.2f} MB/image, "
        f"{summary.images_per_second:.2f} img/s on {torch_device} -> {out}"
    )


def _shard_label(shard: tuple[int, int], launch) -> str:
    """E.g. ``shard 2/4 (torchrun rank 1)``, for per-process summary lines."""
    text = f"shard {shard[0]}/{shard[1]}"
    return text + (f" ({launch.launcher} rank {launch.rank})" if launch.launcher != "none" else "")


def parse_int_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """Callback for comma-separated integers that may be empty (``--lr-steps 2000,4000``)."""
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


caches_option = click.option(
    "--cache",
    "caches",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    multiple=True,
    required=True,
    help="Extract cache of the training images; repeat to train on several (e.g. VOC07 and VOC12 trainval).",
)


def _torch_device(device: str):
    from spp_detect.device import resolve_device

    try:
        return resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None


def _bar(desc: str, unit: str = "img"):
    """A tqdm wrapper for a stage's per-image loop, hidden by -q."""
    from tqdm import tqdm

    quiet = logging.getLogger().getEffectiveLevel() > logging.INFO
    return lambda seq, label=desc: tqdm(seq, desc=label, unit=unit, disable=quiet)


@main.command("finetune")
@caches_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Head folder (head.npz + head.json).")
@click.option("--fc-dim", type=click.IntRange(min=1), default=4096, help="Width of fc6 and fc7 (paper: 4096; 1024 is about 4x faster on a CPU).")
@click.option("--iterations", type=click.IntRange(min=1), default=3000, help="Minibatches of --batch-size windows (release: 3 x 30k).")
@click.option("--lr", "base_lr", type=click.FloatRange(min=0, min_open=True), default=0.01, help="Base learning rate (release: 1e-3 from ImageNet-trained fc layers; fc6/fc7 are random here).")
@click.option("--lr-steps", default="2000", callback=parse_int_list, help="Iterations at which the learning rate is divided by 10 (release: 30000,60000).")
@click.option("--batch-size", type=click.IntRange(min=2), default=128, help="Windows per minibatch (release: 128).")
@click.option("--fg-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.25, help="Share of foreground windows per minibatch (release: 0.25).")
@click.option("--random-scale/--no-random-scale", default=True, help="Pool each training window at a random scale (release: random_scale = 1).")
@click.option("--round-iterations", type=click.IntRange(min=1), default=100, help="Minibatches prepared at once; a checkpoint follows each round.")
@click.option("--seed", type=int, default=0, help="Seed of the initial weights, window sampling and dropout.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None, help="Stop with a checkpoint after this many iterations (rerun to continue).")
@device_option
@force_option
def finetune_cmd(caches, out, fc_dim, iterations, base_lr, lr_steps, batch_size, fg_fraction, random_scale,
                 round_iterations, seed, stop_after, device, force) -> None:
    """Train fc6 -> fc7 -> fc8 (21-way) on pooled SPP features from extract caches (stage 3).

    \b
    Minibatches of 128 windows, 25% foreground (IoU >= 0.5 with a ground truth,
    labelled with its class) and 75% background (IoU in [0.1, 0.5), label 0), each
    pooled at a random scale; SGD with momentum 0.9, weight decay 5e-4, learning
    rate / 10 at each --lr-steps. No conv layer runs. A checkpoint after every
    round: rerun the same command to resume. Under torchrun the minibatches
    are split over the processes (DistributedDataParallel; same result as one
    process at the same --batch-size, up to float rounding).

    \b
    Example:
      spp-detect finetune --cache runs/feat-trainval --out runs/head --fc-dim 1024
      torchrun --nproc-per-node 4 --no-python spp-detect finetune --cache runs/feat-trainval --out runs/head
    """
    from tqdm import tqdm

    from spp_detect.distributed import init_process_group
    from spp_detect.finetune import FinetuneSettings, run_finetune
    from spp_detect.stage_dir import SettingsChanged

    launch = _launch()
    torch_device = _process_device(device, launch)
    if batch_size < launch.world_size:
        raise click.BadParameter(f"{batch_size} windows cannot be split over {launch.world_size} processes", param_hint="--batch-size")
    try:
        settings = FinetuneSettings(
            fc_dim=fc_dim, iterations=iterations, base_lr=base_lr, lr_steps=lr_steps, batch_size=batch_size,
            fg_fraction=fg_fraction, random_scale=random_scale, round_iterations=round_iterations, seed=seed,
        )
        grouped = init_process_group(launch, torch_device)
        quiet = logging.getLogger().getEffectiveLevel() > logging.INFO
        try:
            summary = run_finetune(
                caches, out, settings, device=torch_device, force=force, stop_after=stop_after,
                progress=lambda total, start: tqdm(total=total, initial=start, desc="finetune", unit="it", disable=quiet),
                rank=launch.rank, world_size=launch.world_size,
            )
        finally:
            if grouped:
                import torch.distributed as dist

                dist.destroy_process_group()
    except (SettingsChanged, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if not launch.is_main:
        return  # rank 0 reports for the job
    if summary.already_done:
        click.echo(f"finetune: {out} already holds the trained head (use --force to retrain)")
        return
    last = summary.rounds[-1] if summary.rounds else {}
    state = "done" if (out / "head.npz").is_file() else "stopped (rerun to continue)"
    click.echo(
        f"finetune: {summary.iterations_run} iterations in {summary.seconds:.0f} s"
        + (f" (resumed at {summary.resumed_from})" if summary.resumed_from else "")
        + (f" on {launch.world_size} processes" if launch.world_size > 1 else "")
        + f", last round loss {last.get('loss', float('nan')):.3f}, fg accuracy {last.get('fg_accuracy', 0):.2f}; {state} -> {out}"
    )


@main.command("train-svm")
@caches_option
@click.option("--head", "head_folder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Fine-tuned head (finetune --out), needed for --features fc6/fc7.")
@click.option("--features", "layer", type=click.Choice(["pool", "fc6", "fc7"]), default="fc7",
              help="Window features the SVMs read: the pooled SPP vector or a head layer (paper Table 6 rows).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model folder (svm.npz, svm.json, bbox.npz).")
@click.option("--bbox/--no-bbox", default=False, help="Also fit per-class box regressors on the pooled features.")
@click.option("--bbox-lambda", type=click.FloatRange(min=0, min_open=True), default=4000.0, help="Ridge penalty (SPP-net: 4000; R-CNN: 1000).")
@click.option("--bbox-min-overlap", type=click.FloatRange(0, 1), default=0.5, help="Regress windows with IoU > this (SPP-net: 0.5; R-CNN: 0.6).")
@click.option("--exclude-difficult", is_flag=True, help="Leave difficult ground truths out of the positives (the release keeps them).")
@click.option("--C", "svm_c", type=click.FloatRange(min=0, min_open=True), default=1e-3, help="SVM cost (release: 0.001).")
@device_option
@force_option
def train_svm_cmd(caches, head_folder, layer, out, bbox, bbox_lambda, bbox_min_overlap, exclude_difficult, svm_c, device, force) -> None:
    """One linear SVM per class with hard-negative mining, optionally box regression (stage 4).

    \b
    The release's recipe: ground-truth boxes are positives, windows with IoU < 0.3
    against every box of the class are negatives, features scaled to mean norm 20,
    liblinear (C = 0.001, positive weight 2, bias feature 10), one mining pass
    (keep scores > -1.0001, retrain after 2,000 new ones, evict < -1.2).

    \b
    Examples:
      spp-detect train-svm --cache runs/feat-trainval --head runs/head --features fc7 --bbox --out runs/svm
      spp-detect train-svm --cache runs/feat-trainval --features pool --out runs/svm-pool
    """
    from spp_detect.stage_dir import SettingsChanged
    from svm.train import SVMSettings, run_train_svm

    launch = _launch()
    if launch.world_size > 1:
        raise click.UsageError(
            f"train-svm runs in one process (hard-negative mining goes through the images in order, each pass "
            f"training on the negatives the previous images gave), but {launch.launcher} started {launch.world_size}: "
            "run it without a launcher (under SLURM: srun --ntasks 1; docs/scaling.md)"
        )
    torch_device = _torch_device(device)
    if layer != "pool" and head_folder is None:
        raise click.UsageError(f"--features {layer} reads a fine-tuned head: add --head FOLDER (from finetune), or use --features pool")
    try:
        settings = SVMSettings(layer=layer, C=svm_c, include_difficult=not exclude_difficult, bbox=bbox,
                               bbox_lambda=bbox_lambda, bbox_min_overlap=bbox_min_overlap)
        summary = run_train_svm(caches, out, settings, head_folder=head_folder, device=torch_device, force=force,
                                progress=_bar("train-svm"))
    except (SettingsChanged, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if summary.already_done:
        click.echo(f"train-svm: {out} already holds trained SVMs (use --force to retrain)")
        return
    click.echo(
        f"train-svm: 20 classes on {summary.images} images in {summary.seconds:.0f} s; "
        f"{sum(summary.positives.values())} positives, {sum(summary.negatives.values())} cached hard negatives"
        + (f", box regression on {summary.bbox_samples} windows" if bbox else "") + f" -> {out}"
    )
    if summary.untrained:
        click.echo(f"  no ground truth of {', '.join(summary.untrained)} in the training caches: those classes are never detected", err=True)


@main.command("detect")
@click.option("--cache", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="Extract cache of the test images.")
@click.option("--svm", "svm_folder", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="train-svm folder.")
@click.option("--bbox/--no-bbox", default=False, help="Apply the model's box regressors (train-svm --bbox).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Detections folder: per-image .npz, devkit comp4 files and detections.json (COCO).")
@click.option("--score-threshold", type=float, default=-1.5, help="Keep SVM scores above this (release: -1.5).")
@click.option("--nms", "nms_threshold", type=click.FloatRange(0, 1), default=0.3, help="Per-class NMS IoU (release: 0.3).")
@click.option("--max-per-image", type=click.IntRange(min=1), default=100, help="Detections per class per image (release: 100).")
@click.option("--svd-rank", type=click.IntRange(min=0), default=0,
              help="Replace fc6 by its rank-R truncated SVD (Fast R-CNN 3.1): faster, approximate; 0 keeps it exact.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="fc6/fc7 arithmetic. bf16 rounds weights and input to bfloat16 (float32 sums): ~5x faster fc "
                   "on CPUs with AMX and on GPU tensor cores, approximate (README: its measured mAP cost).")
@device_option
@force_option
@shard_option
def detect_cmd(cache, svm_folder, bbox, out, score_threshold, nms_threshold, max_per_image, svd_rank, precision, device, force, shard) -> None:
    """Score every window of the test cache, NMS per class, write VOC and COCO results (stage 5).

    \b
    Writes <out>/comp4_det_<image-set>_<class>.txt (the devkit's format) and
    <out>/detections.json (COCO results); `spp-detect evaluate --detections <out>`
    reads either. Resumable: rerun to continue. Under torchrun or srun each
    process takes its shard of the images; the shard that finishes last
    writes the result files (a rerun without a launcher writes them too).

    \b
    Example:
      spp-detect detect --cache runs/feat-test --svm runs/svm --bbox --out runs/dets
      spp-detect evaluate --voc-root VOCdevkit --image-set test --detections runs/dets
      torchrun --nproc-per-node 4 --no-python spp-detect detect --cache runs/feat-test --svm runs/svm --out runs/dets
    """
    from spp_detect.detect import DetectSettings, load_detections, missing_images, run_detect
    from spp_detect.distributed import resolve_shard
    from spp_detect.stage_dir import SettingsChanged, read_manifest
    from svm.train import load_svm

    launch = _launch()
    shard_kn = resolve_shard(shard, launch)
    where = "" if shard_kn[1] == 1 and launch.launcher == "none" else f" [{_shard_label(shard_kn, launch)}]"
    torch_device = _process_device(device, launch)
    try:
        model = load_svm(svm_folder, torch_device)
        if bbox and model.regressor is None:
            raise click.BadParameter(f"{svm_folder} has no box regressors: train it with --bbox, or drop --bbox", param_hint="--bbox")
        settings = DetectSettings(score_threshold=score_threshold, nms_threshold=nms_threshold,
                                  max_per_image=max_per_image, bbox=bbox, svd_rank=svd_rank, precision=precision)
        summary = run_detect(cache, out, model, settings, model_key=read_manifest(svm_folder)["key"],
                             device=torch_device, force=force, progress=_bar("detect"), shard=shard_kn)
    except (SettingsChanged, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    per_image = summary.seconds / max(summary.done, 1)
    pending = missing_images(cache, out)  # checked after our last write: the last shard to finish sees none
    if pending:
        click.echo(
            f"detect{where}: {summary.done} image(s) computed ({per_image:.2f} s/image), {summary.skipped} already done; "
            f"{len(pending)} image(s) left to other shards: the last to finish writes the result files "
            f"(or rerun detect without a launcher)"
        )
        return
    image_set = read_manifest(cache)["config"].get("image_set", "test")
    model_info = {"svm": str(svm_folder.resolve()), "classes": list(model.classes), "image_set": image_set}
    count = _write_results(out, load_detections(out, model.classes), model.classes, image_set, model_info)
    click.echo(
        f"detect{where}: {summary.done} image(s) computed ({per_image:.2f} s/image), {summary.skipped} already done; "
        f"{count} detections -> {out}/comp4_det_{image_set}_*.txt and {out}/detections.json"
    )


def _write_results(out: Path, per_class: dict, classes, image_set: str, info: dict) -> int:
    """The devkit comp4 files, detections.json (COCO) and model.json of a detections folder;
    returns the number of detections."""
    import json

    from eval.results import ClassDetections, write_coco_results, write_voc_results
    from spp_detect.stage_dir import atomic_write

    detections = {name: ClassDetections(*arrays) for name, arrays in per_class.items()}
    write_voc_results(detections, out, image_set, comp_id="comp4", classes=classes)
    write_coco_results(detections, out / "detections.json", classes=classes)
    atomic_write(out / "model.json", lambda p: p.write_text(json.dumps(info, indent=2)))
    return sum(len(d) for d in detections.values())


@main.command("calibrate")
@caches_option
@click.option("--svm", "svm_folder", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="train-svm folder; the calibration is stored in it (calibration.npz).")
@device_option
def calibrate_cmd(caches, svm_folder, device) -> None:
    """Fit per-class score calibrations of a model on its training images (for combine).

    \b
    Detects on the training caches as `detect` does and fits, per class, a logistic
    map from SVM score to P(IoU >= 0.5 with a ground truth of the class). Use the
    model's own training caches, never the test set.

    \b
    Example:
      spp-detect calibrate --cache runs/feat-trainval --svm runs/svm
    """
    import json

    from spp_detect.combine import fit_calibration
    from spp_detect.stage_dir import atomic_write
    from svm.train import load_svm

    torch_device = _torch_device(device)
    try:
        model = load_svm(svm_folder, torch_device)
        calibration, counts = fit_calibration(caches, model, device=torch_device, progress=_bar("calibrate"))
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    calibration.save(svm_folder / "calibration.npz")
    info = {"caches": [str(Path(c).resolve()) for c in caches], "detections_per_class": counts,
            "fitted": [n for n, f in zip(calibration.classes, calibration.fitted.tolist()) if f]}
    atomic_write(svm_folder / "calibration.json", lambda p: p.write_text(json.dumps(info, indent=2)))
    unfitted = [n for n, f in zip(calibration.classes, calibration.fitted.tolist()) if not f]
    click.echo(f"calibrate: {sum(counts.values())} training detections, {len(info['fitted'])} classes fitted -> {svm_folder}/calibration.npz")
    if unfitted:
        click.echo(f"  too few correct or wrong detections to fit {', '.join(unfitted)}: sigmoid(score) used", err=True)


@main.command("combine")
@click.option("--detections", "inputs", type=click.Path(exists=True, path_type=Path), multiple=True, required=True,
              help="A detect (or combine) folder; repeat for each model (two or more). With --scores raw, "
              "also a folder of devkit result files or a COCO json.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Combined detections folder.")
@click.option("--nms", "nms_threshold", type=click.FloatRange(0, 1), default=0.3, help="NMS IoU over the union (paper: 0.3).")
@click.option("--scores", type=click.Choice(["calibrated", "raw"]), default="calibrated",
              help="calibrated (default): each model's scores mapped per class to P(correct) by the logistic fit "
              "that `spp-detect calibrate` stored with it on its training images, because SVM margins of different "
              "models are on different scales. raw: the paper's plain union of SVM scores (4.4), right for models "
              "whose SVMs were trained alike.")
@click.option("--image-set", default=None, help="Name used for the devkit files [default: the inputs' own].")
@force_option
def combine_cmd(inputs, out, nms_threshold, scores, image_set, force) -> None:
    """Combine two or more models: union of their scored windows, then NMS (paper 4.4).

    \b
    Example:
      spp-detect calibrate --cache runs/sq-trainval --svm runs/sq-svm
      spp-detect calibrate --cache runs/mb-trainval --svm runs/mb-svm
      spp-detect combine --detections runs/sq-dets --detections runs/mb-dets --out runs/both
      spp-detect evaluate --voc-root VOCdevkit --image-set test --detections runs/both
    """
    import json

    from eval.results import DetectionsError, read_detections
    from spp_detect.combine import ScoreCalibration, as_class_arrays, check_compatible, union_nms, write_per_image
    from spp_detect.datasets.voc import VOC_CLASSES
    from spp_detect.detect import load_detections
    from spp_detect.stage_dir import SettingsChanged, open_stage_dir, source_key

    if len(inputs) < 2:
        raise click.UsageError("give --detections at least twice: combine joins two or more models")
    names, classes, image_ids, arrays, image_sets = [], [], [], [], []
    try:
        for path in inputs:
            info_path = path / "model.json"
            if path.is_dir() and info_path.is_file():
                info = json.loads(info_path.read_text())
                cls = tuple(info["classes"])
                ids = {p.stem for p in path.glob("*.npz") if not p.name.startswith(".")}
                dets = load_detections(path, cls)
                image_sets.append(info.get("image_set"))
                if scores == "calibrated":
                    calib = Path(info.get("calibration") or Path(info["svm"]) / "calibration.npz") if "svm" in info else None
                    if calib is None or not calib.is_file():
                        raise click.ClickException(
                            f"{path}: its model has no score calibration ({calib}); run `spp-detect calibrate --svm "
                            f"{info.get('svm', 'SVM')} --cache TRAIN` or use --scores raw")
                    dets = ScoreCalibration.load(calib).apply(dets)
            else:
                if scores == "calibrated":
                    raise click.ClickException(f"{path} is not a detect folder: it has no model to calibrate with; use --scores raw")
                cls, ids = VOC_CLASSES, None
                dets = as_class_arrays(read_detections(path, image_set or "test"))
            names.append(str(path)), classes.append(cls), image_ids.append(ids), arrays.append(dets)
        check_compatible(names, classes, image_ids)
        config = {"inputs": [source_key(p) if p.is_dir() and (p / "manifest.json").is_file() else str(p.resolve()) for p in inputs],
                  "scores": scores, "nms": nms_threshold}
        open_stage_dir(out, "combine", config, force=force)
    except (ValueError, DetectionsError, SettingsChanged, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    merged = union_nms(arrays, nms_threshold)
    cls = classes[0]
    known = [i for i in image_ids if i is not None]
    write_per_image(out, merged, cls, set().union(*known) if known else None)
    name = image_set or next((s for s in image_sets if s), "test")
    count = _write_results(out, merged, cls, name, {"combined": names, "scores": scores, "classes": list(cls), "image_set": name})
    click.echo(f"combine: {len(inputs)} models, {count} detections after NMS {nms_threshold:g} ({scores} scores) -> {out}")


@main.command("show")
@click.option("--detections", type=click.Path(exists=True, path_type=Path), required=True,
              help="A detect folder, a folder of devkit result files, or a COCO results json.")
@voc_options(default_image_set="test")
@click.option("--image", "image_id", required=True, help="Image id, e.g. 000001.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG (or JPEG) to write.")
@click.option("--threshold", type=float, default=0.0, help="Draw detections scoring above this (SVM margin; 0 is the decision boundary).")
@click.option("--top", type=click.IntRange(min=1), default=20, help="At most this many boxes, best first.")
@click.option("--ground-truth/--no-ground-truth", default=True, help="Also draw the annotated boxes (dashed white).")
def show_cmd(detections, voc_root, year, image_set, image_id, out, threshold, top, ground_truth) -> None:
    """Draw one image's detections (class and score) and its ground truth into a picture.

    \b
    Example:
      spp-detect show --detections runs/dets --voc-root VOCdevkit --image 000001 --out 000001.png
    """
    import cv2
    import numpy as np

    from eval.results import DetectionsError, read_detections
    from spp_detect.datasets.voc import VOCFormatError, read_voc
    from spp_detect.extract import ImageReadError, load_image_rgb
    from spp_detect.show import draw_boxes

    try:
        images = {im.image_id: im for im in read_voc(voc_root, image_set, year)}
        if image_id not in images:
            raise click.BadParameter(f"{image_id} is not in the {image_set} image set", param_hint="--image")
        image = images[image_id]
        dets = read_detections(detections, image_set)
        pixels = load_image_rgb(image.path)
    except (VOCFormatError, DetectionsError, ImageReadError) as exc:
        raise click.ClickException(str(exc)) from None
    from spp_detect.datasets.voc import VOC_CLASSES

    rows = []
    for c, name in enumerate(VOC_CLASSES):
        d = dets.get(name)
        if d is None:
            continue
        mine = (d.image_ids == image_id) & (d.scores > threshold)
        rows += [(float(s), c, name, b) for s, b in zip(d.scores[mine], d.boxes[mine])]
    rows = sorted(rows, key=lambda r: -r[0])[:top]
    canvas = draw_boxes(
        pixels,
        np.array([r[3] for r in rows]).reshape(-1, 4),
        [f"{r[2]} {r[0]:.2f}" for r in rows],
        [r[1] for r in rows],
        ground_truth=image.boxes if ground_truth else None,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), canvas[:, :, ::-1]):
        raise click.ClickException(f"cannot write {out} (is the extension .png or .jpg?)")
    click.echo(f"show: {len(rows)} detection(s) of {image_id} above {threshold:g} -> {out}")


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
    "--voc2007-cls",
    "protocol",
    flag_value="voc-cls",
    show_default=False,
    help="Image classification AP per class and mAP (VOCevalcls.m) of --scores.",
)
@click.option(
    "--scores",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="With --voc2007-cls: folder of devkit files <comp>_cls_<image-set>_<class>.txt ('<image_id> <score>' lines).",
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
@limit_option
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
    limit: int | None,
    detections: Path | None,
    metric: str | None,
    rule: str,
    iou_threshold: float,
    comp_id: str | None,
    json_out: Path | None,
    plots: Path | None,
    scores: Path | None = None,
) -> None:
    """Score detections against VOC ground truth: devkit AP (--voc2007) or COCO metrics (--coco).

    \b
    spp-detect evaluate --voc2007 --voc-root R --image-set test --detections D \\
        [--metric 11point|area] [--rule devkit|py-faster-rcnn] [--json OUT] [--plots DIR]
    spp-detect evaluate --coco --voc-root R --image-set test --detections D [--json OUT]
    spp-detect evaluate --voc2007-cls --voc-root R --image-set test --scores S [--json OUT]
    spp-detect evaluate --retrieval paris6k --index runs/paris-index [--rerank 100] [--json OUT]
    """
    import json

    from eval.results import DetectionsError, read_detections
    from spp_detect.datasets.voc import VOC_CLASSES, VOCFormatError
    from spp_detect.stage_dir import atomic_write

    if retrieval is not None:
        summary = _evaluate_retrieval(index_dir, ground_truth, rerank)
        if json_out is not None:
            atomic_write(json_out, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, sort_keys=True)))
            click.echo(f"wrote {json_out}")
        return
    if protocol == "voc-cls":
        if voc_root is None:
            raise click.UsageError("Missing option '--voc-root'.")
        return evaluate_cls(ctx, voc_root, year, image_set, scores, metric, comp_id, json_out, plots)
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
        images = read_voc_or_usage_error(voc_root, image_set, year, limit)
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


# --------------------------------------------------------------------------- image classification (paper section 3)
def evaluate_cls(
    ctx: click.Context, voc_root: Path, year: str, image_set: str, scores: Path | None, metric: str | None,
    comp_id: str | None, json_out: Path | None, plots: Path | None,
) -> None:
    """`evaluate --voc2007-cls`: devkit classification AP (VOCevalcls.m) of a folder of score files."""
    import json

    from eval.results import DetectionsError
    from eval.voc_cls import evaluate_voc_cls, read_cls_results
    from spp_detect.datasets.voc import VOC_CLASSES, VOCFormatError, read_voc
    from spp_detect.stage_dir import atomic_write

    given = [f"--{n.replace('_', '-')}" for n in ("detections", "rule", "iou_threshold")
             if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"{', '.join(given)} do not apply to --voc2007-cls")
    if scores is None:
        raise click.UsageError("--voc2007-cls needs --scores FOLDER (devkit <comp>_cls_<set>_<class>.txt files)")
    metric = metric or ("11point" if not year.isdigit() or int(year) < 2010 else "area")
    try:
        images = read_voc(voc_root, image_set, year)
        result = evaluate_voc_cls(read_cls_results(scores, image_set, comp_id), images, use_07_metric=metric == "11point")
    except (VOCFormatError, DetectionsError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"VOC{year} {image_set}, {len(images)} images; classification {metric} AP (Python VOCevalcls.m)")
    click.echo(f"{'class':<12} {'AP':>7} {'positives':>10}")
    for name in VOC_CLASSES:
        click.echo(f"{name:<12} {result.ap[name]:>7.4f} {result.positives[name]:>10d}")
    click.echo(f"{'mAP':<12} {result.map:>7.4f}")
    if json_out is not None:
        summary = {"protocol": "voc-cls", "year": year, "image_set": image_set, "scores": str(scores), **result.to_json()}
        atomic_write(json_out, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, sort_keys=True)))
        click.echo(f"wrote {json_out}")
    if plots is not None:
        from eval.plots import plot_pr_curves

        curves = {name: (*result.curves[name], result.ap[name]) for name in VOC_CLASSES}
        path = plot_pr_curves(curves, plots / "pr_curves.png", title=f"VOC{year} {image_set} classification: mAP {result.map:.4f}")
        click.echo(f"wrote {path}")


def _image_source(voc_root, year, image_set, image_folder, split, train_per_class, test_per_class, seed, limit):
    """(image ids, paths, labels [N, K] in {1, 0, -1}, classes, dataset description) of a VOC set or an image folder."""
    import numpy as np

    if image_folder is not None:
        from spp_detect.datasets.image_folder import read_image_folder, split_per_class

        everything, classes = read_image_folder(image_folder)
        images = split_per_class(everything, split, train_per_class, test_per_class, seed)[:limit]
        labels = np.full((len(images), len(classes)), -1, dtype=np.int8)
        labels[np.arange(len(images)), [im.label for im in images]] = 1
        dataset = {"image_folder": str(image_folder), "split": split, "train_per_class": train_per_class,
                   "test_per_class": test_per_class, "seed": seed, "limit": limit}
        return [im.image_id for im in images], [im.path for im in images], labels, classes, dataset
    from eval.voc_cls import voc_cls_ground_truth
    from spp_detect.datasets.voc import VOC_CLASSES, read_voc

    images = read_voc(voc_root, image_set, year)[:limit]
    dataset = {"voc_year": year, "image_set": image_set, "limit": limit}
    return [im.image_id for im in images], [im.path for im in images], voc_cls_ground_truth(images), VOC_CLASSES, dataset


def image_source_options(default_image_set: str):
    """A VOC image set (--voc-root ...) or an image folder split (--image-folder ...)."""

    def decorate(f):
        f = click.option("--seed", type=int, default=0, help="With --image-folder: seed of the random split.")(f)
        f = click.option("--test-per-class", type=click.IntRange(min=1), default=50, help="With --image-folder: test images per class (paper 3.3: up to 50).")(f)
        f = click.option("--train-per-class", type=click.IntRange(min=1), default=30, help="With --image-folder: training images per class (paper 3.3: 30).")(f)
        f = click.option("--split", type=click.Choice(["train", "test"]), default="train", help="With --image-folder: which part of the per-class split.")(f)
        f = click.option(
            "--image-folder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
            help="Instead of VOC: a <class>/<image> folder (e.g. Caltech101's 101_ObjectCategories).",
        )(f)
        f = limit_option(f)
        f = _not_required("voc_root")(voc_options(default_image_set)(f))
        return f

    return decorate


def _check_weights(weights: str) -> None:
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise click.BadParameter(f"not 'imagenet', 'none' or an existing file: {weights}", param_hint="--weights")


def _device(device: str):
    from spp_detect.device import resolve_device

    try:
        return resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None


@main.command("classify-features")
@image_source_options(default_image_set="trainval")
@backbone_options
@click.option("--view", type=click.Choice(["full", "crop"]), default="full",
              help="full: shorter side resized to --size, any aspect ratio; crop: then the centre --size square (paper 3.2).")
@click.option("--size", type=click.IntRange(min=32), default=224, help="Shorter side in pixels (paper: 224; best full size on VOC: 392).")
@click.option("--levels", default="1,2,3,6", callback=parse_scales, help="Pyramid levels pooled over the whole conv map (6: the single pool5 level).")
@click.option("--pooling", type=click.Choice(["spp", "plain"]), default="spp",
              help="spp: the pyramid --levels; plain: a plain net's fixed 3x3/2 pool5 (needs --view crop).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Features folder.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, help="Images per batch (same-shape views run together).")
@device_option
@force_option
def classify_features_cmd(
    voc_root, year, image_set, limit, image_folder, split, train_per_class, test_per_class, seed,
    backbone, weights, input_norm, view, size, levels, pooling, out, batch_size, device, force,
) -> None:
    """One whole-image SPP feature per image (paper 3.2): the conv map of the full image
    (or its centre crop) pooled by the spatial pyramid.

    \b
    Examples (VOC2007; then `train-classifier`):
      spp-detect classify-features --voc-root VOCdevkit --image-set trainval --view full --size 392 \\
          --backbone squeezenet1_0 --weights squeezenet.pth --out runs/cls-trainval
      spp-detect classify-features --voc-root VOCdevkit --image-set test --view full --size 392 \\
          --backbone squeezenet1_0 --weights squeezenet.pth --out runs/cls-test
    Caltech101 (30 train / 50 test images per class, paper 3.3):
      spp-detect classify-features --image-folder 101_ObjectCategories --split train --out runs/c101-train
      spp-detect classify-features --image-folder 101_ObjectCategories --split test --out runs/c101-test
    Output: manifest.json, images.json (ids, labels), one <n>.npy (float32 [C * bins]) per image.
    Rerun to resume.
    """
    from tqdm import tqdm

    from spp_detect.backbones import build_trunk, resolve_normalization
    from spp_detect.classification.features import FeatureSettings, run_classify_features
    from spp_detect.datasets.voc import VOCFormatError
    from spp_detect.extract import ImageReadError, prepare_trunk
    from spp_detect.stage_dir import SettingsChanged

    if image_folder is None and voc_root is None:
        raise click.UsageError("give --voc-root (VOC) or --image-folder (e.g. Caltech101)")
    _check_weights(weights)
    torch_device = _device(device)
    try:
        settings = FeatureSettings(backbone, weights, input_norm, view, size, levels, pooling)
        ids, paths, labels, classes, dataset = _image_source(
            voc_root, year, image_set, image_folder, split, train_per_class, test_per_class, seed, limit)

        def trunk_factory():
            trunk = prepare_trunk(build_trunk(backbone, weights), torch_device)
            return trunk, resolve_normalization(backbone, weights, input_norm)

        done, skipped, seconds = run_classify_features(
            ids, paths, labels, classes, out, settings, dataset, trunk_factory, torch_device, force=force,
            batch_size=batch_size, progress=lambda r: tqdm(total=len(r), desc="classify-features", unit="img"),
        )
    except (VOCFormatError, SettingsChanged, ImageReadError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None
    rate = f", {done / seconds:.1f} img/s" if done and seconds else ""
    click.echo(f"classify-features: {done} image(s) computed, {skipped} already done{rate} -> {out}")


def _write_scores(scores, feature_set_ids, classes, folder: Path, image_set: str, labels) -> str:
    """Write devkit score files; return a one-line summary (accuracy for single-label sets)."""
    import numpy as np

    from eval.voc_cls import write_cls_results

    write_cls_results(scores, feature_set_ids, folder, image_set, classes=classes)
    line = f"wrote {len(classes)} score files to {folder}"
    single = (labels == 1).sum(1) == 1
    if len(labels) and single.all():
        truth = labels.argmax(1)
        per_class = [float((scores[truth == k].argmax(1) == k).mean()) for k in np.unique(truth)]
        line += f"; accuracy {float((scores.argmax(1) == truth).mean()):.4f}, mean per-class {np.mean(per_class):.4f}"
    return line


@main.command("train-classifier")
@click.option("--features", "features_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Training features (output of classify-features).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Classifier .npz to write.")
@click.option("--C", "c", type=click.FloatRange(min=0, min_open=True), default=1.0, help="SVM soft margin (paper 3.2: 1).")
@click.option("--score", "score_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Also score these features (e.g. the test set's) ...")
@click.option("--scores-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="... into devkit files <comp1>_cls_<set>_<class>.txt in this folder (for `evaluate --voc2007-cls`).")
def train_classifier_cmd(features_dir: Path, out: Path, c: float, score_dir: Path | None, scores_out: Path | None) -> None:
    """One linear SVM per class on L2-normalised whole-image features, C = 1, no
    augmentation (paper 3.2). Images labelled 0 for a class (VOC: only difficult objects of
    it) are left out of that class.

    \b
    Example:
      spp-detect train-classifier --features runs/cls-trainval --out runs/svm.npz \\
          --score runs/cls-test --scores-out runs/cls-scores
      spp-detect evaluate --voc2007-cls --voc-root VOCdevkit --image-set test --scores runs/cls-scores
    """
    from spp_detect.classification.features import load_features
    from spp_detect.classification.svm import SVMSettings, save_classifier, train_svms

    if (score_dir is None) != (scores_out is None):
        raise click.UsageError("--score and --scores-out go together")
    try:
        train = load_features(features_dir)
        config = {"features": train.config}
        classifier = train_svms(train.features, train.labels, train.classes, SVMSettings(C=c), config)
        save_classifier(out, classifier)
        click.echo(f"trained {len(train.classes)} linear SVMs on {len(train.image_ids)} images "
                   f"({train.features.shape[1]}-d, C={c:g}) -> {out}")
        if score_dir is not None:
            test = load_features(score_dir)
            if test.classes != train.classes:
                raise ValueError(f"{score_dir} has other classes than {features_dir}")
            if {k: v for k, v in test.config.items() if k != "dataset"} != {k: v for k, v in train.config.items() if k != "dataset"}:
                raise ValueError(f"{score_dir} was computed with other feature settings than {features_dir}")
            image_set = str(test.config.get("dataset", {}).get("image_set") or test.config.get("dataset", {}).get("split"))
            scores = classifier.scores(test.features)
            click.echo(_write_scores(scores, test.image_ids, test.classes, scores_out, image_set, test.labels))
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command("train-spp-classifier")
@image_source_options(default_image_set="trainval")
@backbone_options
@click.option("--sizes", default="224", callback=parse_scales, help="Training input sizes, one per epoch in turn: 224 (single-size) or 224,180 (multi-size, paper 2.3).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, help="Training epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, help="SGD learning rate (momentum 0.9, weight decay 5e-4).")
@click.option("--hidden", type=click.IntRange(min=1), default=128, help="Width of the hidden fc layer of the head.")
@click.option("--trainable-layers", type=click.IntRange(min=0), default=1, help="Last trunk layers trained with the head (SqueezeNet: 1 = fire9).")
@click.option("--train-seed", type=int, default=0, help="Seed of the head's init and of crops, flips, order and dropout.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Training folder (checkpoint.pt, model.pt).")
@click.option("--score-set", default=None, help="Afterwards score this VOC image set (e.g. test) at both test views into OUT/scores-<view>-<set>/.")
@device_option
@force_option
def train_spp_classifier_cmd(
    voc_root, year, image_set, limit, image_folder, split, train_per_class, test_per_class, seed,
    backbone, weights, input_norm, sizes, epochs, batch_size, lr, hidden, trainable_layers, train_seed,
    out, score_set, device, force,
) -> None:
    """Train an SPP classifier end to end on image labels (paper 2.3): conv trunk, a spatial
    pyramid {1,2,3,6} over the whole map, a small fc head, multi-label loss.

    \b
    Random 224 crops (and flips) of images resized to 256; --sizes 224,180 switches to
    180 inputs (the same crops resized) every other epoch, one set of parameters.
    A checkpoint is written after every epoch: rerun the same command to resume.
    Tested on the crop (centre 224 of 256) and full (all of 256) views (paper Table 2).

    \b
    Example:
      spp-detect train-spp-classifier --voc-root VOCdevkit --image-set trainval --sizes 224,180 \\
          --backbone squeezenet1_0 --weights squeezenet.pth --epochs 10 --out runs/spp-multi --score-set test
      spp-detect evaluate --voc2007-cls --voc-root VOCdevkit --scores runs/spp-multi/scores-full-test
    """
    from tqdm import tqdm

    from spp_detect.backbones import resolve_normalization
    from spp_detect.classification.train import TrainSettings, load_trained, predict, run_training
    from spp_detect.datasets.voc import VOCFormatError
    from spp_detect.extract import ImageReadError, load_image_rgb
    from spp_detect.stage_dir import SettingsChanged

    if image_folder is None and voc_root is None:
        raise click.UsageError("give --voc-root (VOC) or --image-folder (e.g. Caltech101)")
    if score_set is not None and voc_root is None:
        raise click.UsageError("--score-set scores a VOC image set: give --voc-root")
    _check_weights(weights)
    torch_device = _device(device)
    try:
        settings = TrainSettings(backbone, weights, input_norm, sizes, hidden=hidden, trainable_layers=trainable_layers,
                                 epochs=epochs, batch_size=batch_size, lr=lr, seed=train_seed)
        ids, paths, labels, classes, dataset = _image_source(
            voc_root, year, image_set, image_folder, split, train_per_class, test_per_class, seed, limit)
        norm = resolve_normalization(backbone, weights, input_norm)
        pixels = [load_image_rgb(p) for p in tqdm(paths, desc="read images", unit="img", leave=False)]
        state = run_training(
            pixels, labels, classes, out, settings, norm, torch_device, dataset=dataset, force=force,
            progress=lambda batches, total: tqdm(batches, total=total, desc="train", unit="batch", leave=False),
            on_epoch=lambda e, s, loss: click.echo(f"epoch {e + 1}/{epochs}: size {s}, loss {loss:.4f}"),
        )
        click.echo(f"trained {len(state.losses) - state.resumed_from} epoch(s)"
                   f"{f' (resumed after epoch {state.resumed_from})' if state.resumed_from else ''} -> {out}")
        if score_set is not None:
            model = load_trained(out, settings, len(classes), torch_device)
            test_ids, test_paths, test_labels, _, _ = _image_source(voc_root, year, score_set, None, "", 0, 0, 0, None)
            test_pixels = [load_image_rgb(p) for p in test_paths]
            for view in ("crop", "full"):
                scores = predict(model, norm, test_pixels, view, torch_device, size=settings.resize, crop=settings.crop)
                folder = out / f"scores-{view}-{score_set}"
                click.echo(f"{view} view: " + _write_scores(scores, test_ids, classes, folder, score_set, test_labels))
    except (VOCFormatError, SettingsChanged, ImageReadError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None


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
