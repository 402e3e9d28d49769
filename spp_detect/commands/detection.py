"""The detector stages: proposals, extract, finetune, train-svm, detect, calibrate, combine."""

from __future__ import annotations


import click

from spp_detect.commands.checks import nothing_done
from spp_detect.commands.options import (
    IN_DIR, IN_FILE, IN_PATH, OUT_DIR, OUT_FILE, POSITIVE_FLOAT, POSITIVE_INT, SKIP_BAD_HINT, backbone_options, bar,
    caches_option, dataset_options, detect_settings_options, device_option, echo_skipped, force_option, job,
    open_dataset_or_usage_error, out_option, parse_int_list, parse_scales, pick_device, refuse_given,
    settings_from_params, settings_options, shard_option, skip_bad_option, stage_errors, where, workers_option,
)

PROPOSAL_SETTINGS = "proposals.run:ProposalSettings"
EXTRACT_SETTINGS = "spp_detect.extract:ExtractSettings"
FINETUNE_SETTINGS = "spp_detect.finetune:FinetuneSettings"
SVM_SETTINGS = "svm.train:SVMSettings"
COMBINE_SETTINGS = "spp_detect.combine:CombineSettings"
svm_option = click.option("--svm", "svm_folder", type=IN_DIR, required=True, help="train-svm folder.")


@click.command("proposals")
@dataset_options(default_image_set="test")
@out_option("Proposals folder: manifest.json + one <image_id>.npy (float32 [N, 4], 0-based xyxy) per image.")
@settings_options(PROPOSAL_SETTINGS, mode=click.Choice(["fast", "opencv-fast", "opencv-quality"]), max_boxes=POSITIVE_INT,
                  min_size=click.IntRange(min=0), min_size_reference=click.IntRange(min=0), seed=int,
                  max_pixels=click.IntRange(min=10_000))
@skip_bad_option()
@click.option("--import", "import_file", type=IN_PATH, help="Fill --out from precomputed boxes instead: an R-CNN/Fast "
              "R-CNN selective-search .mat (images, boxes; 1-based y1 x1 y2 x2) or another proposals folder. No --voc-root needed.")
@click.option("--export-mat", type=OUT_FILE, help="Afterwards write --out as an R-CNN-style .mat (images, boxes; 1-based "
              "y1 x1 y2 x2). Alone with --out: export an existing folder.")
@workers_option
@force_option
@shard_option
@click.pass_context
def proposals_cmd(ctx, out, import_file, export_mat, force, **params) -> None:
    """Selective search windows per image (stage 1), or import / export precomputed boxes.

    \b
    Examples (resumable; --import: R-CNN's VOC07 boxes; --export-mat: share yours):
      spp-detect proposals --voc-root VOCdevkit --image-set test --out props/test
      spp-detect proposals --import selective_search_data/voc_2007_test.mat --out props/test
      spp-detect proposals --out props/test --export-mat voc_2007_test.mat
    """
    from proposals.io import export_mat_file
    from proposals.run import import_proposals

    searching = params["voc_root"] is not None or params["coco_json"] is not None or bool(params["image_paths"])
    if import_file is None and not searching and export_mat is None:
        raise click.UsageError("give --voc-root (or --coco-json / --images) to compute proposals, --import FILE to import, "
                               "or --export-mat FILE to export --out")
    image_ids = None
    with stage_errors(SKIP_BAD_HINT):
        if import_file is not None:
            refuse_given(ctx, ("voc_root", "coco_json", "image_paths", "limit", "skip_bad", "workers", "mode", "max_boxes",
                               "min_size", "min_size_reference", "seed", "max_pixels"), "not used with --import (it stores the file's boxes as they are)")
            click.echo(f"imported {import_file}: {import_proposals(import_file, out, force=force).describe()}")
        elif searching:
            image_ids = _search_proposals(out, force, export_mat is not None, **params)
        if export_mat is not None:
            click.echo(f"exported {export_mat_file(out, export_mat, image_ids)} images to {export_mat}")


def _search_proposals(out, force, exporting, voc_root, year, image_set, coco_json, image_paths, limit, skip_bad, workers,
                      shard, **params) -> list[str]:
    """`proposals` on a dataset: run the stage, print its summary; the ids of the images with boxes."""
    from proposals.run import ProposalSettings, run_proposals

    launch, shard_kn, _ = job(shard)
    if exporting and shard_kn[1] > 1:
        raise click.UsageError("--export-mat needs every shard's boxes: export once the job is done "
                               "(spp-detect proposals --out DIR --export-mat FILE, one process)")
    unreadable: list | None = [] if skip_bad else None
    dataset = open_dataset_or_usage_error(voc_root, image_set, year, coco_json, image_paths, limit, unreadable)
    summary = run_proposals(dataset.images, out, settings_from_params(ProposalSettings, params), dataset.manifest_identity(),
                            workers=workers, force=force, skip_bad=skip_bad, progress=bar(), shard=shard_kn, bad=unreadable)
    click.echo(summary.describe())
    echo_skipped(summary.bad)
    if summary.bad and not summary.done and not summary.skipped:
        raise nothing_done("proposals", len(summary.bad), dataset.image_folder)
    return [im.image_id for im in dataset.images if im.image_id not in {e.image_id for e in summary.bad}]


@click.command("extract")
@dataset_options()
@click.option("--proposals", "proposals_path", type=IN_PATH, required=True,
              help="Output folder of `spp-detect proposals`, or an R-CNN selective-search .mat file.")
@backbone_options(EXTRACT_SETTINGS)
@settings_options(EXTRACT_SETTINGS, scales=parse_scales, levels=parse_scales, mode=click.Choice(["spp", "crop-warp"]),
                  flip="--flip/--no-flip", max_proposals=POSITIVE_INT, precision=click.Choice(["fp32", "bf16"]))
@click.option("--head", "head_folder", type=IN_DIR, default=None,
              help="Compute the maps with the fine-tuned trunk of this finetune folder (finetune --train-from): "
                   "its backbone, weights and input normalisation replace --backbone/--weights/--input-norm.")
@out_option("Cache folder.")
@device_option
@force_option
@shard_option
@skip_bad_option("missing, unreadable, badly annotated or without usable proposals")
def extract_cmd(voc_root, year, image_set, coco_json, image_paths, limit, proposals_path, head_folder, out, device, force,
                shard, skip_bad, **params) -> None:
    """Conv maps once per scale per image, windows assigned to scales, cached.

    \b
    Example (README "2. extract"; torchrun / srun: each process a shard of the images):
      spp-detect extract --voc-root VOCdevkit --image-set test --proposals runs/ss-test \\
          --backbone squeezenet1_0 --weights squeezenet.pth --out runs/feat-test
    """
    from spp_detect.extract import ExtractSettings, run_extract

    launch, shard_kn, torch_device = job(shard, device)
    bad: list | None = [] if skip_bad else None
    with stage_errors(SKIP_BAD_HINT):
        settings = settings_from_params(ExtractSettings, params)
        if head_folder is not None:
            from spp_detect.conv_finetune import with_trunk_of

            settings = with_trunk_of(settings, head_folder)
        dataset = open_dataset_or_usage_error(voc_root, image_set, year, coco_json, image_paths, limit, bad)
        summary = run_extract(dataset.images, proposals_path, out, settings, image_set=dataset.name,
                              device=torch_device, force=force, shard=shard_kn, skip_bad=skip_bad, classes=dataset.classes,
                              result_ids=dataset.result_ids, progress=bar(suffix=where(shard_kn, launch)))
    echo_skipped([*(bad or []), *summary.bad])
    skipped = len(bad or []) + len(summary.bad)
    if skipped and not summary.done and not summary.skipped:
        raise nothing_done("extract" + where(shard_kn, launch), skipped, dataset.image_folder)
    click.echo(summary.describe(out, torch_device, where(shard_kn, launch), bad_before=len(bad or [])))


@click.command("finetune")
@caches_option
@out_option("Head folder (head.npz + head.json).")
@settings_options(FINETUNE_SETTINGS, fc_dim=POSITIVE_INT, iterations=POSITIVE_INT, base_lr=("--lr", POSITIVE_FLOAT),
                  lr_steps=parse_int_list, batch_size=click.IntRange(min=2),
                  fg_fraction=click.FloatRange(0, 1, min_open=True, max_open=True), random_scale="--random-scale/--no-random-scale",
                  round_iterations=POSITIVE_INT, seed=int, train_from=str, images_per_batch=POSITIVE_INT,
                  train_scales=lambda ctx, param, value: parse_scales(ctx, param, value) if value not in (None, "", ()) else ())
@click.option("--weights", type=IN_FILE, default=None,
              help="With --train-from: the weights file the caches were extracted with (the trunk starts from it).")
@click.option("--init-head", "init_head", type=IN_DIR, default=None,
              help="Start fc6-fc8 from this finetune folder's head instead of random init (e.g. the fc-only head).")
@click.option("--stop-after", type=click.IntRange(min=1), default=None, help="Stop with a checkpoint after this many iterations (rerun to continue).")
@device_option
@force_option
def finetune_cmd(caches, out, weights, init_head, stop_after, device, force, **params) -> None:
    """Train fc6 -> fc7 -> fc8 on pooled SPP features from extract caches (stage 3),
    or, with --train-from, the conv trunk from that layer too, through SPP.

    \b
    Examples (README "3. finetune"; rerun to resume; torchrun splits the minibatches):
      spp-detect finetune --cache runs/feat-trainval --out runs/head --fc-dim 1024
      spp-detect finetune --cache runs/feat-trainval --cache runs/feat-trainval-flip --fc-dim 1024 \\
          --train-from fire5 --weights squeezenet.pth --init-head runs/head --out runs/head-conv
      spp-detect extract ... --head runs/head-conv --out runs/feat-test-conv   # caches of the trained trunk
    """

    from spp_detect.distributed import process_group
    from spp_detect.finetune import FinetuneSettings, run_finetune

    launch, _, torch_device = job(device=device)
    with stage_errors(), process_group(launch, torch_device):
        summary = run_finetune(caches, out, settings_from_params(FinetuneSettings, params), device=torch_device, force=force,
                               weights=weights, init_head=init_head, stop_after=stop_after, rank=launch.rank, world_size=launch.world_size,
                               progress=bar("it"))
    if launch.is_main:  # rank 0 reports for the job
        click.echo(summary.describe(out))


@click.command("train-svm")
@caches_option
@click.option("--head", "head_folder", type=IN_DIR, default=None, help="Fine-tuned head (finetune --out), needed for --features fc6/fc7.")
@settings_options(SVM_SETTINGS, layer=("--features", click.Choice(["pool", "fc6", "fc7"])))
@out_option("Model folder (svm.npz, svm.json, bbox.npz).")
@settings_options(SVM_SETTINGS, bbox="--bbox/--no-bbox", bbox_lambda=POSITIVE_FLOAT, bbox_min_overlap=click.FloatRange(0, 1),
                  include_difficult="--include-difficult/--exclude-difficult", C=(), tol=POSITIVE_FLOAT,
                  solver=click.Choice(["dcd", "liblinear"]), precision=click.Choice(["fp32", "bf16"]))
@device_option
@force_option
def train_svm_cmd(caches, head_folder, out, device, force, **params) -> None:
    """One linear SVM per class with hard-negative mining, optionally box regression (stage 4).

    \b
    Examples (the release's recipe, README "4. train-svm"):
      spp-detect train-svm --cache runs/feat-trainval --head runs/head --features fc7 --bbox --out runs/svm
      spp-detect train-svm --cache runs/feat-trainval --features pool --out runs/svm-pool
    """
    from svm.train import SVMSettings, run_train_svm

    launch = job()[0]
    if launch.world_size > 1:
        raise click.UsageError(
            f"train-svm runs in one process (hard-negative mining goes through the images in order, each pass training on "
            f"the negatives the previous images gave), but {launch.launcher} started {launch.world_size}: run it without a "
            "launcher (under SLURM: srun --ntasks 1; docs/scaling.md)")
    with stage_errors():
        summary = run_train_svm(caches, out, settings_from_params(SVMSettings, params), head_folder=head_folder,
                                device=pick_device(device), force=force, progress=bar())
    click.echo(summary.describe(out))


@click.command("detect")
@click.option("--cache", type=IN_DIR, required=True, help="Extract cache of the test images.")
@svm_option
@out_option("Detections folder: per-image .npz, devkit comp4 files and detections.json (COCO).")
@detect_settings_options()
@device_option
@force_option
@shard_option
def detect_cmd(cache, svm_folder, out, device, force, shard, **params) -> None:
    """Score every window of the test cache, NMS per class, write VOC and COCO results (stage 5).

    \b
    Example (writes comp4_det_<image-set>_<class>.txt files and detections.json):
      spp-detect detect --cache runs/feat-test --svm runs/svm --bbox --out runs/dets
    """
    from spp_detect.detect import DetectSettings, run_detect

    launch, shard_kn, torch_device = job(shard, device)
    with stage_errors():
        summary = run_detect(cache, svm_folder, out, settings_from_params(DetectSettings, params), device=torch_device,
                             force=force, progress=bar(suffix=where(shard_kn, launch)), shard=shard_kn)
    click.echo(summary.describe(out, where(shard_kn, launch)))


@click.command("calibrate")
@caches_option
@svm_option
@click.option("--out", type=OUT_DIR, default=None, help="Calibration folder [default: <svm>/calibration, where combine looks].")
@detect_settings_options("spp_detect.combine:CalibrateSettings", "detect.")
@device_option
@force_option
def calibrate_cmd(caches, svm_folder, out, device, force, **params) -> None:
    """Fit per-class score calibrations of a model on its training images (for combine).

    \b
    Example (the detect options of the detections to combine; README "Combining models"):
      spp-detect calibrate --cache runs/feat-trainval --svm runs/svm --bbox
    """
    from spp_detect.combine import CalibrateSettings, run_calibrate
    from spp_detect.detect import DetectSettings

    out = out or svm_folder / "calibration"
    with stage_errors():
        settings = CalibrateSettings(detect=settings_from_params(DetectSettings, params))
        summary = run_calibrate(caches, svm_folder, out, settings, device=pick_device(device), force=force,
                                progress=bar())
    click.echo(summary.describe(out))


@click.command("combine")
@click.option("--detections", "inputs", type=IN_PATH, multiple=True, required=True, help="A detect (or combine) folder; "
              "repeat for each model (two or more). With --scores raw, also a folder of devkit result files or a COCO json.")
@out_option("Combined detections folder.")
@settings_options(COMBINE_SETTINGS, nms_threshold=("--nms", click.FloatRange(0, 1)), scores=click.Choice(["calibrated", "raw"]),
                  image_set=())
@force_option
def combine_cmd(inputs, out, force, **params) -> None:
    """Combine two or more models: union of their scored windows, then NMS (paper 4.4).

    \b
    Example (after `spp-detect calibrate` of each model):
      spp-detect combine --detections runs/sq-dets --detections runs/mb-dets --out runs/both
    """
    from spp_detect.combine import CombineSettings, run_combine

    with stage_errors():
        settings = settings_from_params(CombineSettings, params)
        summary = run_combine(inputs, out, settings, force=force)
    click.echo(summary.describe(out))


#: registered on the group by cli.py, in this order
COMMANDS = (proposals_cmd, extract_cmd, finetune_cmd, train_svm_cmd, detect_cmd, calibrate_cmd, combine_cmd)
