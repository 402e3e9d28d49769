"""The detector stages: proposals, extract, finetune, train-svm, detect, calibrate, combine."""

from __future__ import annotations

from pathlib import Path

import click

from spp_detect.commands.options import (
    backbone_options,
    bar,
    caches_option,
    dataset_options,
    detect_settings_options,
    device_option,
    force_option,
    job_launch,
    job_shard,
    limit_option,
    message,
    not_required,
    open_dataset_or_usage_error,
    parse_int_list,
    parse_scales,
    pick_device,
    quiet,
    refuse_given,
    settings_from_params,
    settings_option,
    shard_option,
    stage_errors,
    voc_options,
    where,
    workers_option,
)


PROPOSAL_SETTINGS = "proposals.run:ProposalSettings"
EXTRACT_SETTINGS = "spp_detect.extract:ExtractSettings"
FINETUNE_SETTINGS = "spp_detect.finetune:FinetuneSettings"
SVM_SETTINGS = "svm.train:SVMSettings"
SKIP_BAD_HINT = "; fix or remove it, or rerun with --skip-bad to skip it"


@click.command("proposals")
@not_required("voc_root")
@voc_options(default_image_set="test")
@dataset_options
@limit_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Proposals folder: manifest.json + one <image_id>.npy (float32 [N, 4], 0-based xyxy) per image.")
@settings_option(PROPOSAL_SETTINGS, "mode", "--mode", type=click.Choice(["fast", "opencv-fast", "opencv-quality"]),
                 help="fast: selective search's fast mode as the paper and R-CNN ran it (HSV+Lab, k=50,100, two "
                 "strategies; on VOC07 test the first 100 / 300 / all boxes cover 62% / 80% / 95% of objects at IoU 0.5). "
                 "opencv-fast / opencv-quality: OpenCV's parameter sets on the same engine (opencv-fast: k=150,300,450, "
                 "~1,100 boxes, 94%; opencv-quality: five colour spaces, k=150..750, four strategies, ~5x slower).")
@settings_option(PROPOSAL_SETTINGS, "max_boxes", "--max-boxes", type=click.IntRange(min=1),
                 help="Keep the first N boxes per image. Files are ranked best first as in the paper's selective search: "
                 "each box's hierarchy priority (1 = a hierarchy's last merge, the whole image; larger towards its initial "
                 "segments) times a uniform random number, ascending (Uijlings et al. IJCV 2013 sec. 5; R-CNN "
                 "selective_search_boxes.m), so large merged regions tend to come first (R-CNN: ~2000).")
@settings_option(PROPOSAL_SETTINGS, "min_size", "--min-size", type=click.IntRange(min=0),
                 help="Drop boxes narrower or shorter than this, in pixels (R-CNN: 20).")
@settings_option(PROPOSAL_SETTINGS, "seed", "--seed", type=int,
                 help="Seed of the random factor in the ranking (numpy, reset per image: results do not depend on order "
                 "or --workers).")
@settings_option(PROPOSAL_SETTINGS, "max_pixels", "--max-pixels", type=click.IntRange(min=10_000),
                 help="Search larger images on a copy shrunk to this many pixels (boxes scaled back); bounds memory and time.")
@click.option("--skip-bad", is_flag=True, help="Skip images that are missing, unreadable or badly annotated (counted and "
              "listed in the summary) instead of stopping.")
@click.option("--import", "import_file", type=click.Path(exists=True, path_type=Path),
              help="Fill --out from precomputed boxes instead: an R-CNN/Fast R-CNN selective-search .mat (images, boxes; "
              "1-based y1 x1 y2 x2) or another proposals folder. No --voc-root needed.")
@click.option("--export-mat", type=click.Path(dir_okay=False, path_type=Path),
              help="Afterwards write --out as an R-CNN-style .mat (images, boxes; 1-based y1 x1 y2 x2). Alone with --out: "
              "export an existing folder.")
@workers_option
@force_option
@shard_option
@click.pass_context
def proposals_cmd(ctx, voc_root, year, image_set, coco_json, image_paths, limit, out, skip_bad, import_file, export_mat,
                  workers, force, shard, **params) -> None:
    """Selective search windows per image (stage 1), or import / export precomputed boxes.

    \b
    Compute (resumable; a rerun skips finished images, changed settings need --force):
      spp-detect proposals --voc-root VOCdevkit --image-set test --out props/test
      spp-detect proposals --coco-json instances_val.json --images photos --out props/val
    Import the standard R-CNN VOC07 boxes, or export yours to share them:
      spp-detect proposals --import selective_search_data/voc_2007_test.mat --out props/test
      spp-detect proposals --out props/test --export-mat voc_2007_test.mat
    Several processes (machines) fill one folder, each a shard of the images:
      torchrun --nproc-per-node 4 --no-python spp-detect proposals --voc-root VOCdevkit --out props/test
    """
    from proposals.io import export_mat_file
    from proposals.run import ProposalSettings, import_proposals, run_proposals

    searching = voc_root is not None or coco_json is not None or bool(image_paths)
    if import_file is None and not searching and export_mat is None:
        raise click.UsageError("give --voc-root (or --coco-json / --images) to compute proposals, --import FILE to import, "
                               "or --export-mat FILE to export --out")
    image_ids = None
    with stage_errors(SKIP_BAD_HINT):
        if import_file is not None:
            refuse_given(ctx, ("voc_root", "coco_json", "image_paths", "limit", "skip_bad", "workers", *params),
                         "not used with --import (it stores the file's boxes as they are)")
            click.echo(f"imported {import_file}: {import_proposals(import_file, out, force=force).describe()}")
        elif searching:
            launch, shard_kn = job_shard(shard)
            if export_mat is not None and shard_kn[1] > 1:
                raise click.UsageError("--export-mat needs every shard's boxes: export once the job is done "
                                       "(spp-detect proposals --out DIR --export-mat FILE, one process)")
            unreadable: list | None = [] if skip_bad else None
            dataset = open_dataset_or_usage_error(voc_root, image_set, year, coco_json, image_paths, limit, unreadable)
            images = dataset.images
            summary = run_proposals(images, out, settings_from_params(ProposalSettings, params), dataset.describe(),
                                    workers=workers, force=force, skip_bad=skip_bad, progress=not quiet(), shard=shard_kn,
                                    bad=unreadable)
            click.echo(summary.describe())
            for error in summary.bad:
                click.echo(f"  skipped {error}", err=True)
            image_ids = [im.image_id for im in images if im.image_id not in {e.image_id for e in summary.bad}]
        if export_mat is not None:
            click.echo(f"exported {export_mat_file(out, export_mat, image_ids)} images to {export_mat}")


@click.command("extract")
@not_required("voc_root", "image_set")
@voc_options()
@dataset_options
@limit_option
@click.option("--proposals", "proposals_path", type=click.Path(exists=True, path_type=Path), required=True,
              help="Output folder of `spp-detect proposals`, or an R-CNN selective-search .mat file.")
@backbone_options(EXTRACT_SETTINGS)
@settings_option(EXTRACT_SETTINGS, "scales", "--scales", callback=parse_scales,
                 help="Shorter-side scales (paper 4.1); '688' is the paper's 1-scale setting.")
@settings_option(EXTRACT_SETTINGS, "levels", "--levels", callback=parse_scales, help="Pyramid levels, in feature order (paper: 1,2,3,6).")
@settings_option(EXTRACT_SETTINGS, "mode", "--mode", type=click.Choice(["spp", "crop-warp"]),
                 help="spp: the paper (conv maps once per scale, windows pooled from them). crop-warp: R-CNN's baseline, "
                 "every window cropped with 16 px context, warped to 224 and run through the trunk alone (its map pooled "
                 "whole with the same pyramid; --scales is ignored). Slow by design: for comparisons.")
@settings_option(EXTRACT_SETTINGS, "flip", "--flip/--no-flip",
                 help="Cache the left-right mirror of every image (boxes mirrored, same ids): the release fine-tunes on "
                 "flipped images too. Give it to finetune beside the plain cache: --cache feat --cache feat-flip.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Cache folder.")
@device_option
@force_option
@shard_option
@click.option("--skip-bad", is_flag=True, help="Skip images that are missing, unreadable, badly annotated or without usable "
              "proposals (counted and listed in the summary) instead of stopping.")
def extract_cmd(voc_root, year, image_set, coco_json, image_paths, limit, proposals_path, out, device, force, shard, skip_bad,
                **params) -> None:
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
      spp-detect extract --coco-json instances_val.json --images photos --proposals runs/ss-val \\
          --weights squeezenet.pth --out runs/feat-val      # the json's classes go into the cache
      torchrun --nproc-per-node 4 --no-python spp-detect extract --voc-root VOCdevkit \\
          --image-set test --proposals runs/ss-test --out runs/feat-test
    """
    from proposals.io import load_proposals
    from spp_detect.extract import ExtractSettings, run_extract
    from spp_detect.stage_dir import source_key

    launch, shard_kn = job_shard(shard)
    torch_device = pick_device(device, launch)
    bad: list | None = [] if skip_bad else None
    with stage_errors(SKIP_BAD_HINT):
        settings = settings_from_params(ExtractSettings, params)
        dataset = open_dataset_or_usage_error(voc_root, image_set, year, coco_json, image_paths, limit, bad)
        images = dataset.images
        boxes = load_proposals(proposals_path, [im.image_id for im in images], bad=bad)
        images = [im for im in images if im.image_id in boxes] if bad else images
        summary = run_extract(images, boxes, out, settings,
                              proposals_key=source_key(proposals_path), image_set=dataset.name, device=torch_device,
                              force=force, shard=shard_kn, progress=bar("extract" + where(shard_kn, launch)), skip_bad=skip_bad,
                              classes=dataset.classes)
    for error in [*(bad or []), *summary.bad]:
        click.echo(f"  skipped {message(error)}", err=True)
    redone = f", {summary.redone} damaged file(s) redone" if summary.redone else ""
    click.echo(f"extract{where(shard_kn, launch)}: {summary.done} image(s) computed, {summary.skipped} already cached, "
               f"{len(bad or []) + len(summary.bad)} bad{redone}, {summary.windows / max(summary.done, 1):.0f} windows/image, "
               f"{summary.bytes_written / max(summary.done, 1) / 1e6:.2f} MB/image, "
               f"{summary.images_per_second:.2f} img/s on {torch_device} -> {out}")


@click.command("finetune")
@caches_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Head folder (head.npz + head.json).")
@settings_option(FINETUNE_SETTINGS, "fc_dim", "--fc-dim", type=click.IntRange(min=1),
                 help="Width of fc6 and fc7 (paper: 4096; 1024 is about 4x faster on a CPU).")
@settings_option(FINETUNE_SETTINGS, "iterations", "--iterations", type=click.IntRange(min=1),
                 help="Minibatches of --batch-size windows (release: 3 x 30k).")
@settings_option(FINETUNE_SETTINGS, "base_lr", "--lr", "base_lr", type=click.FloatRange(min=0, min_open=True),
                 help="Base learning rate (release: 1e-3 from ImageNet-trained fc layers; fc6/fc7 are random here).")
@settings_option(FINETUNE_SETTINGS, "lr_steps", "--lr-steps", callback=parse_int_list,
                 help="Iterations at which the learning rate is divided by 10 (release: 30000,60000).")
@settings_option(FINETUNE_SETTINGS, "batch_size", "--batch-size", type=click.IntRange(min=2), help="Windows per minibatch (release: 128).")
@settings_option(FINETUNE_SETTINGS, "fg_fraction", "--fg-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                 help="Share of foreground windows per minibatch (release: 0.25).")
@settings_option(FINETUNE_SETTINGS, "random_scale", "--random-scale/--no-random-scale",
                 help="Pool each training window at a random scale (release: random_scale = 1).")
@settings_option(FINETUNE_SETTINGS, "round_iterations", "--round-iterations", type=click.IntRange(min=1),
                 help="Minibatches prepared at once; a checkpoint follows each round.")
@settings_option(FINETUNE_SETTINGS, "seed", "--seed", type=int, help="Seed of the initial weights, window sampling and dropout.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None, help="Stop with a checkpoint after this many iterations (rerun to continue).")
@device_option
@force_option
def finetune_cmd(caches, out, stop_after, device, force, **params) -> None:
    """Train fc6 -> fc7 -> fc8 on pooled SPP features from extract caches (stage 3).

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

    from spp_detect.distributed import process_group
    from spp_detect.finetune import FinetuneSettings, run_finetune

    launch = job_launch()
    torch_device = pick_device(device, launch)
    if params["batch_size"] < launch.world_size:
        raise click.BadParameter(f"{params['batch_size']} windows cannot be split over {launch.world_size} processes",
                                 param_hint="--batch-size")
    with stage_errors(), process_group(launch, torch_device):
        summary = run_finetune(caches, out, settings_from_params(FinetuneSettings, params), device=torch_device, force=force,
                               stop_after=stop_after, rank=launch.rank, world_size=launch.world_size,
                               progress=lambda total, start: tqdm(total=total, initial=start, desc="finetune", unit="it", disable=quiet()))
    if launch.is_main:  # rank 0 reports for the job
        click.echo(summary.describe(out) + (f" on {launch.world_size} processes" if launch.world_size > 1 else ""))


@click.command("train-svm")
@caches_option
@click.option("--head", "head_folder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Fine-tuned head (finetune --out), needed for --features fc6/fc7.")
@settings_option(SVM_SETTINGS, "layer", "--features", "layer", type=click.Choice(["pool", "fc6", "fc7"]),
                 help="Window features the SVMs read: the pooled SPP vector or a head layer (paper Table 6 rows).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model folder (svm.npz, svm.json, bbox.npz).")
@settings_option(SVM_SETTINGS, "bbox", "--bbox/--no-bbox", help="Also fit per-class box regressors on the pooled features.")
@settings_option(SVM_SETTINGS, "bbox_lambda", "--bbox-lambda", type=click.FloatRange(min=0, min_open=True),
                 help="Ridge penalty (SPP-net: 4000; R-CNN: 1000).")
@settings_option(SVM_SETTINGS, "bbox_min_overlap", "--bbox-min-overlap", type=click.FloatRange(0, 1),
                 help="Regress windows with IoU > this (SPP-net: 0.5; R-CNN: 0.6).")
@settings_option(SVM_SETTINGS, "include_difficult", "--include-difficult/--exclude-difficult",
                 help="Difficult ground truths among the positives (the release keeps them).")
@settings_option(SVM_SETTINGS, "C", "--C", "C", help="SVM cost: a positive number, or 'auto' = 0.001 x 5011 / training "
                 "images, the release's 0.001 on VOC07's 5,011 trainval images.")
@device_option
@force_option
def train_svm_cmd(caches, head_folder, out, device, force, **params) -> None:
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
    from svm.train import SVMSettings, run_train_svm

    launch = job_launch()
    if launch.world_size > 1:
        raise click.UsageError(
            f"train-svm runs in one process (hard-negative mining goes through the images in order, each pass training on "
            f"the negatives the previous images gave), but {launch.launcher} started {launch.world_size}: run it without a "
            "launcher (under SLURM: srun --ntasks 1; docs/scaling.md)")
    if params["layer"] != "pool" and head_folder is None:
        raise click.UsageError(f"--features {params['layer']} reads a fine-tuned head: add --head FOLDER (from finetune), "
                               "or use --features pool")
    with stage_errors():
        summary = run_train_svm(caches, out, settings_from_params(SVMSettings, params), head_folder=head_folder,
                                device=pick_device(device), force=force, progress=bar("train-svm"))
    click.echo(summary.describe(out))
    if summary.untrained:
        click.echo(f"  no ground truth of {', '.join(summary.untrained)} in the training caches: those classes are never "
                   "detected", err=True)


@click.command("detect")
@click.option("--cache", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="Extract cache of the test images.")
@click.option("--svm", "svm_folder", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="train-svm folder.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Detections folder: per-image .npz, devkit comp4 files and detections.json (COCO).")
@detect_settings_options()
@device_option
@force_option
@shard_option
def detect_cmd(cache, svm_folder, out, device, force, shard, **params) -> None:
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
    from spp_detect.detect import DetectSettings, run_detect

    launch, shard_kn = job_shard(shard)
    torch_device = pick_device(device, launch)
    with stage_errors():
        model, model_key = load_model(svm_folder, torch_device, bbox=params["bbox"])
        summary = run_detect(cache, out, model, settings_from_params(DetectSettings, params), model_key=model_key,
                             model_folder=svm_folder, device=torch_device, force=force, progress=bar("detect"), shard=shard_kn)
    done = (f"detect{where(shard_kn, launch)}: {summary.done} image(s) computed "
            f"({summary.seconds / max(summary.done, 1):.2f} s/image), {summary.skipped} already done; ")
    if summary.pending:
        click.echo(done + f"{summary.pending} image(s) left to other shards: the last to finish writes the result "
                   "files (or rerun detect without a launcher)")
    else:
        click.echo(done + f"{summary.total_detections} detections -> {out}/comp4_det_{summary.image_set}_*.txt "
                   f"and {out}/detections.json")


def load_model(svm_folder: Path, device, bbox: bool = False):
    """``(model, its key)`` of a train-svm folder; ``bbox`` asks for its box regressors."""
    from spp_detect.stage_dir import source_key
    from svm.train import load_svm

    model = load_svm(svm_folder, device)
    if bbox and model.regressor is None:
        raise click.BadParameter(f"{svm_folder} has no box regressors: train it with --bbox, or drop --bbox", param_hint="--bbox")
    return model, source_key(svm_folder)


@click.command("calibrate")
@caches_option
@click.option("--svm", "svm_folder", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="train-svm folder.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Calibration folder [default: <svm>/calibration, where combine looks].")
@detect_settings_options("spp_detect.combine:CalibrateSettings", "detect.")
@device_option
@force_option
def calibrate_cmd(caches, svm_folder, out, device, force, **params) -> None:
    """Fit per-class score calibrations of a model on its training images (for combine).

    \b
    Detects on the training caches as `detect` does, with the same detect options as
    the detections to combine (combine checks), and fits, per class, a logistic map
    from SVM score to P(IoU >= 0.5 with a ground truth of the class). Use the
    model's own training caches, never the test set.

    \b
    Example:
      spp-detect calibrate --cache runs/feat-trainval --svm runs/svm --bbox
    """
    from spp_detect.combine import CalibrateSettings, run_calibrate
    from spp_detect.detect import DetectSettings

    out = out or svm_folder / "calibration"
    torch_device = pick_device(device)
    with stage_errors():
        model, model_key = load_model(svm_folder, torch_device, bbox=params["bbox"])
        settings = CalibrateSettings(detect=settings_from_params(DetectSettings, params))
        summary = run_calibrate(caches, model, out, settings, model_key=model_key, device=torch_device, force=force,
                                progress=bar("calibrate"))
    fitted = len(summary.detections) - len(summary.unfitted)
    again = " (already fitted; --force refits)" if summary.already_done else ""
    click.echo(f"calibrate: {sum(summary.detections.values())} training detections, {fitted} classes fitted{again} -> {out}")
    if summary.unfitted:
        click.echo(f"  too few correct or wrong detections to fit {', '.join(summary.unfitted)}: sigmoid(score) used", err=True)


COMBINE_SETTINGS = "spp_detect.combine:CombineSettings"


@click.command("combine")
@click.option("--detections", "inputs", type=click.Path(exists=True, path_type=Path), multiple=True, required=True,
              help="A detect (or combine) folder; repeat for each model (two or more). With --scores raw, "
              "also a folder of devkit result files or a COCO json.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Combined detections folder.")
@settings_option(COMBINE_SETTINGS, "nms_threshold", "--nms", "nms_threshold", type=click.FloatRange(0, 1),
                 help="NMS IoU over the union (paper: 0.3).")
@settings_option(COMBINE_SETTINGS, "scores", "--scores", type=click.Choice(["calibrated", "raw"]),
                 help="calibrated: each model's scores mapped per class to P(correct) by the logistic fit "
                 "that `spp-detect calibrate` stored for it on its training images, because SVM margins of different "
                 "models are on different scales. raw: the paper's plain union of SVM scores (4.4), right for models "
                 "whose SVMs were trained alike.")
@settings_option(COMBINE_SETTINGS, "image_set", "--image-set", help="Name used for the devkit files [default: the inputs' own].")
@force_option
def combine_cmd(inputs, out, force, **params) -> None:
    """Combine two or more models: union of their scored windows, then NMS (paper 4.4).

    \b
    Example:
      spp-detect calibrate --cache runs/sq-trainval --svm runs/sq-svm --bbox
      spp-detect calibrate --cache runs/mb-trainval --svm runs/mb-svm --bbox
      spp-detect combine --detections runs/sq-dets --detections runs/mb-dets --out runs/both
      spp-detect evaluate --voc-root VOCdevkit --image-set test --detections runs/both
    """
    from spp_detect.combine import CombineSettings, run_combine

    if len(inputs) < 2:
        raise click.UsageError("give --detections at least twice: combine joins two or more models")
    with stage_errors():
        settings = settings_from_params(CombineSettings, params)
        summary = run_combine(inputs, out, settings, force=force)
    click.echo(f"combine: {summary.models} models, {summary.detections} detections after NMS {settings.nms_threshold:g} "
               f"({settings.scores} scores) -> {out}")


#: registered on the group by cli.py, in this order
COMMANDS = (proposals_cmd, extract_cmd, finetune_cmd, train_svm_cmd, detect_cmd, calibrate_cmd, combine_cmd)
