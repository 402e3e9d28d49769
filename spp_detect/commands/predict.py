"""A trained model on your own images: ``export-model`` (a self-contained model folder) and
``predict`` (proposals -> extract -> detect in memory, drawn PNGs + COCO json)."""

from __future__ import annotations

from pathlib import Path

import click

from spp_detect.commands.checks import nothing_done
from spp_detect.commands.options import (
    IN_DIR, IN_FILE, IN_PATH, POSITIVE_INT, SKIP_BAD_HINT, bar, device_option, echo_skipped, limit_option,
    open_dataset_or_usage_error, out_option, pick_device, settings_options, stage_errors,
)

PREDICT_SETTINGS = "spp_detect.model:PredictSettings"


@click.command("export-model")
@click.option("--svm", "svm_folder", type=IN_DIR, required=True, help="train-svm folder (its head and box regressors come along).")
@click.option("--cache", "cache_folder", type=IN_DIR, required=True,
              help="One of the extract caches the SVMs were trained on: it records the backbone, scales, levels and classes.")
@click.option("--weights", type=IN_FILE, default=None,
              help="The weights file that cache was extracted with (checked by SHA-256); not needed for imagenet / none.")
@click.option("--copy-weights", is_flag=True,
              help="Copy the weights file into the model folder, so that the folder alone moves to another machine.")
@out_option("Model folder to write.")
def export_model_cmd(svm_folder: Path, cache_folder: Path, weights: Path | None, copy_weights: bool, out: Path) -> None:
    """Write a self-contained model folder for `spp-detect predict` and load_model().

    \b
    Example (with --copy-weights the folder alone moves to another machine):
      spp-detect export-model --svm runs/svm --cache runs/feat-trainval \\
          --weights squeezenet.pth --copy-weights --out runs/model
    """
    from spp_detect.model import export_model

    with stage_errors():
        export_model(svm_folder, cache_folder, out, weights=weights, copy_weights=copy_weights)
    click.echo(f"export-model: {svm_folder} -> {out}/model.json" + (" (weights copied in)" if copy_weights else ""))


@click.command("predict")
@click.argument("images", nargs=-1, required=True, type=IN_PATH)
@click.option("--model", "model_folder", type=IN_DIR, required=True, help="A model folder (spp-detect export-model).")
@out_option("Folder for <image>.png (detections drawn) and detections.json (COCO results).")
@settings_options(PREDICT_SETTINGS, threshold=float, top=POSITIVE_INT)
@click.option("--weights", type=IN_FILE, default=None, help="The model's weights file at another place than it records (same SHA-256).")
@limit_option
@click.option("--coco-json", type=IN_FILE, default=None, help="Predict on the images of this COCO dataset json "
              "(IMAGES: the one folder its file_name entries are relative to); detections.json is then in its own "
              "image and category ids.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (listed in the summary) instead of stopping.")
@device_option
def predict_cmd(images, model_folder, out, threshold, top, weights, limit, coco_json, skip_bad, device) -> None:
    """Detect objects in images or folders of images with a trained model.

    \b
    Example (in memory: proposals, trunk and detector per image; a PNG each, detections.json):
      spp-detect predict --model runs/model photos/ extra.jpg --out runs/predicted
      spp-detect predict --model runs/model --coco-json instances_val.json photos/ --out runs/predicted-val
    """
    from spp_detect.datasets.registry import class_difference
    from spp_detect.model import PredictSettings, load_model, run_predict

    with stage_errors(SKIP_BAD_HINT):
        bad: list | None = [] if skip_bad else None
        dataset = open_dataset_or_usage_error(None, None, "2007", coco_json, images, limit, bad)
        model = load_model(model_folder, weights=weights, device=pick_device(device))
        if coco_json is not None and class_difference(dataset.classes, model.classes) is not None:
            raise click.ClickException(f"the model's classes differ from those of {coco_json} "
                                       f"({class_difference(dataset.classes, model.classes)}): its category ids would "
                                       "name other classes")
        summary = run_predict(model, dataset.images, out, PredictSettings(threshold=threshold, top=top), skip_bad=skip_bad,
                              progress=bar(), result_ids=dataset.result_ids)
    echo_skipped((bad or []) + summary.bad)
    if not summary.seconds and (bad or summary.bad):
        raise nothing_done("predict", len((bad or []) + summary.bad), dataset.image_folder)
    click.echo(summary.describe(out))


COMMANDS = (export_model_cmd, predict_cmd)
