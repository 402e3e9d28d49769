"""A trained model on your own images: ``export-model`` (a self-contained model folder) and
``predict`` (proposals -> extract -> detect in memory, drawn PNGs + COCO json)."""

from __future__ import annotations

from pathlib import Path

import click

from spp_detect.commands.options import bar, device_option, limit_option, pick_device, settings_option, stage_errors

PREDICT_SETTINGS = "spp_detect.model:PredictSettings"


@click.command("export-model")
@click.option("--svm", "svm_folder", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="train-svm folder (its head and box regressors come along).")
@click.option("--cache", "cache_folder", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="One of the extract caches the SVMs were trained on: it records the backbone, scales, levels and classes.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The weights file that cache was extracted with (checked by SHA-256); not needed for imagenet / none.")
@click.option("--copy-weights", is_flag=True,
              help="Copy the weights file into the model folder, so that the folder alone moves to another machine.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model folder to write.")
def export_model_cmd(svm_folder: Path, cache_folder: Path, weights: Path | None, copy_weights: bool, out: Path) -> None:
    """Write a self-contained model folder for `spp-detect predict` and load_model().

    \b
    It records the backbone, the weights file and its SHA-256, the extract settings,
    the head, SVMs, box regressors and class names. With --copy-weights the weights
    file goes into the folder too: copy the folder to another machine as it is.

    \b
    Example:
      spp-detect export-model --svm runs/svm --cache runs/feat-trainval \\
          --weights squeezenet.pth --copy-weights --out runs/model
    """
    from spp_detect.model import export_model

    with stage_errors():
        export_model(svm_folder, cache_folder, out, weights=weights, copy_weights=copy_weights)
    click.echo(f"export-model: {svm_folder} -> {out}/model.json" + (" (weights copied in)" if copy_weights else ""))


@click.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model_folder", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A model folder (spp-detect export-model).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for <image>.png (detections drawn) and detections.json (COCO results).")
@settings_option(PREDICT_SETTINGS, "threshold", "--threshold", type=float,
                 help="Draw detections scoring above this (SVM margin; 0 is the decision boundary). The json keeps all.")
@settings_option(PREDICT_SETTINGS, "top", "--top", type=click.IntRange(min=1), help="At most this many boxes drawn per image.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The model's weights file at another place than it records (same SHA-256).")
@limit_option
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (listed in the summary) instead of stopping.")
@device_option
def predict_cmd(images, model_folder, out, threshold, top, weights, limit, skip_bad, device) -> None:
    """Detect objects in images or folders of images with a trained model.

    \b
    Runs selective search, the conv trunk and the detector on each image in memory
    (no proposals or cache folders are written) and writes one PNG per image with its
    detections drawn (class, score) and detections.json (COCO results: image_id = the
    file name's stem, category_id = 1 + class index). Prints each image's time.

    \b
    Example:
      spp-detect predict --model runs/model photos/ extra.jpg --out runs/predicted
    """
    from spp_detect.datasets.image_folder import read_images
    from spp_detect.model import PredictSettings, load_model, run_predict

    with stage_errors("; fix or remove it, or rerun with --skip-bad to skip it"):
        bad: list | None = [] if skip_bad else None
        plain = read_images(images, limit=limit, bad=bad)
        model = load_model(model_folder, weights=weights, device=pick_device(device))
        summary = run_predict(model, plain, out, PredictSettings(threshold=threshold, top=top), skip_bad=skip_bad,
                              progress=bar("predict"))
    for error in (bad or []) + summary.bad:
        click.echo(f"  skipped {error}", err=True)
    for image_id, seconds in summary.seconds.items():
        click.echo(f"  {image_id}: {summary.detections[image_id]} detections ({summary.drawn[image_id]} drawn), {seconds:.2f} s")
    count = len(summary.seconds)
    per_image = sum(summary.seconds.values()) / max(count, 1)
    click.echo(f"predict: {count} image(s), {per_image:.2f} s/image, {sum(summary.detections.values())} detections "
               f"-> {out}/detections.json and {len(summary.pictures)} PNG(s)")


COMMANDS = (export_model_cmd, predict_cmd)
