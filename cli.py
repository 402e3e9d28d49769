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
      3. finetune    fc6 -> fc7 -> fc8 on pooled features (no conv layer runs)
      4. train-svm   linear SVMs with hard-negative mining (+ box regression)
      5. detect      score windows, NMS; VOC comp4 files and COCO json
      6. evaluate    VOC07 11-point AP (devkit-exact) / COCO metrics, PR curves
    Tools:
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
                shard=shard_kn,
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
    from spp_detect.datasets.voc import VOCFormatError, read_voc
    from spp_detect.distributed import resolve_shard
    from spp_detect.extract import ExtractSettings, ImageReadError, run_extract
    from spp_detect.stage_dir import SettingsChanged, source_key

    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise click.BadParameter(f"not 'imagenet', 'none' or an existing file: {weights}", param_hint="--weights")
    launch = _launch()
    shard_kn = resolve_shard(shard, launch)
    torch_device = _process_device(device, launch)
    try:
        images = read_voc(voc_root, image_set, year)[:limit]
        boxes = load_proposals(proposals_path, [im.image_id for im in images])
        settings = ExtractSettings(
            backbone=backbone, weights=weights, input_norm=input_norm, scales=scales, levels=levels, mode=mode
        )
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
                                       unit="img", position=shard_kn[0] - 1 if launch.world_size > 1 else None),
        )
    except (VOCFormatError, SettingsChanged, ImageReadError, KeyError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None
    per_image = summary.bytes_written / max(summary.done, 1) / 1e6
    where = "" if shard_kn[1] == 1 and launch.launcher == "none" else f" [{_shard_label(shard_kn, launch)}]"
    click.echo(
        f"extract{where}: {summary.done} image(s) computed, {summary.skipped} already cached, "
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
@device_option
@force_option
@shard_option
def detect_cmd(cache, svm_folder, bbox, out, score_threshold, nms_threshold, max_per_image, device, force, shard) -> None:
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
    from eval.results import ClassDetections, write_coco_results, write_voc_results
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
                                  max_per_image=max_per_image, bbox=bbox)
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
    per_class = load_detections(out, model.classes)
    detections = {name: ClassDetections(*arrays) for name, arrays in per_class.items()}
    write_voc_results(detections, out, image_set, comp_id="comp4", classes=model.classes)
    write_coco_results(detections, out / "detections.json", classes=model.classes)
    count = sum(len(d) for d in detections.values())
    click.echo(
        f"detect{where}: {summary.done} image(s) computed ({per_image:.2f} s/image), {summary.skipped} already done; "
        f"{count} detections -> {out}/comp4_det_{image_set}_*.txt and {out}/detections.json"
    )


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
@voc_options(default_image_set="test")
@limit_option
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
    limit: int | None,
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
    from spp_detect.datasets.voc import VOC_CLASSES, VOCFormatError, read_voc
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
        images = read_voc(voc_root, image_set, year)[:limit]
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


if __name__ == "__main__":
    main()
