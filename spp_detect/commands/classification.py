"""Image classification commands (paper section 3): classify-features, train-classifier,
train-spp-classifier."""

from __future__ import annotations

from pathlib import Path

import click

from spp_detect.commands.options import (
    IN_DIR, OUT_DIR, OUT_FILE, POSITIVE_FLOAT, POSITIVE_INT, backbone_options, bar, device_option, force_option,
    image_source_options, out_option, parse_scales, pick_device, settings_from_params, settings_options,
    stage_errors,
)

FEATURE_SETTINGS = "spp_detect.classification.features:FeatureSettings"
TRAIN_SETTINGS = "spp_detect.classification.train:TrainSettings"
CLASSIFIER_SETTINGS = "spp_detect.classification.svm:ClassifierSettings"
SOURCE_OPTIONS = ("voc_root", "year", "image_set", "image_folder", "split", "train_per_class", "test_per_class", "seed", "limit")


def _images(params: dict):
    """The labelled images the image-source options name (and takes them out of ``params``)."""
    from spp_detect.classification.stages import labelled_images

    source = {name: params.pop(name) for name in SOURCE_OPTIONS}
    if source["image_folder"] is None and source["voc_root"] is None:
        raise click.UsageError("give --voc-root (VOC) or --image-folder (e.g. Caltech101)")
    return labelled_images(**source)


@click.command("classify-features")
@image_source_options(default_image_set="trainval")
@backbone_options(FEATURE_SETTINGS)
@settings_options(FEATURE_SETTINGS, view=click.Choice(["full", "crop"]), size=click.IntRange(min=32), levels=parse_scales,
                  pooling=click.Choice(["spp", "plain"]))
@out_option("Features folder.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, help="Images per batch (same-shape views run together).")
@device_option
@force_option
def classify_features_cmd(out, batch_size, device, force, **params) -> None:
    """One whole-image SPP feature per image (paper 3.2): the conv map of the full image
    (or its centre crop) pooled by the spatial pyramid.

    \b
    Examples (VOC2007, then `train-classifier`; Caltech101, paper 3.3; rerun to resume):
      spp-detect classify-features --voc-root VOCdevkit --image-set trainval --view full --size 392 \\
          --backbone squeezenet1_0 --weights squeezenet.pth --out runs/cls-trainval
      spp-detect classify-features --image-folder 101_ObjectCategories --split train --out runs/c101-train
    Output: manifest.json, images.json (ids, labels), one <n>.npy (float32 [C * bins]) per image.
    """

    from spp_detect.classification.features import FeatureSettings, run_classify_features

    torch_device = pick_device(device)
    with stage_errors():
        images = _images(params)
        summary = run_classify_features(
            images.ids, images.paths, images.labels, images.classes, out, settings_from_params(FeatureSettings, params),
            images.dataset, device=torch_device, force=force, batch_size=batch_size,
            progress=bar())
    click.echo(summary.describe(out))


@click.command("train-classifier")
@click.option("--features", "features_dir", type=IN_DIR, required=True, help="Training features (output of classify-features).")
@out_option("Classifier .npz to write.", OUT_FILE)
@settings_options(CLASSIFIER_SETTINGS, C=POSITIVE_FLOAT)
@click.option("--score", "score_dir", type=IN_DIR, default=None, help="Also score these features (e.g. the test set's) ...")
@click.option("--scores-out", type=OUT_DIR, default=None,
              help="... into devkit files <comp1>_cls_<set>_<class>.txt in this folder (for `evaluate --voc2007-cls`).")
def train_classifier_cmd(features_dir: Path, out: Path, score_dir: Path | None, scores_out: Path | None, **params) -> None:
    """One linear SVM per class on L2-normalised whole-image features, C = 1, no
    augmentation (paper 3.2). Images labelled 0 for a class (VOC: only difficult objects of
    it) are left out of that class.

    \b
    Example:
      spp-detect train-classifier --features runs/cls-trainval --out runs/svm.npz \\
          --score runs/cls-test --scores-out runs/cls-scores
    """
    from spp_detect.classification.stages import run_train_classifier
    from spp_detect.classification.svm import ClassifierSettings

    if (score_dir is None) != (scores_out is None):
        raise click.UsageError("--score and --scores-out go together")
    with stage_errors():
        summary = run_train_classifier(features_dir, out, settings_from_params(ClassifierSettings, params),
                                       score=score_dir, scores_out=scores_out)
    click.echo(summary.describe(out))


@click.command("train-spp-classifier")
@image_source_options(default_image_set="trainval")
@backbone_options(TRAIN_SETTINGS)
@settings_options(TRAIN_SETTINGS, sizes=parse_scales, epochs=POSITIVE_INT, batch_size=POSITIVE_INT, lr=POSITIVE_FLOAT,
                  hidden=POSITIVE_INT, trainable_layers=click.IntRange(min=0), seed=("--train-seed", "train_seed", int))
@out_option("Training folder (checkpoint.pt, model.pt).")
@click.option("--score-set", default=None, help="Afterwards score this VOC image set (e.g. test) at both test views into OUT/scores-<view>-<set>/.")
@device_option
@force_option
def train_spp_classifier_cmd(out, score_set, device, force, **params) -> None:
    """Train an SPP classifier end to end on image labels (paper 2.3): conv trunk, a spatial
    pyramid {1,2,3,6} over the whole map, a small fc head, multi-label loss.

    \b
    Example (a checkpoint after every epoch: rerun to resume; README "Image classification"):
      spp-detect train-spp-classifier --voc-root VOCdevkit --image-set trainval --sizes 224,180 \\
          --backbone squeezenet1_0 --weights squeezenet.pth --epochs 10 --out runs/spp-multi --score-set test
    """

    from spp_detect.classification.stages import labelled_images, run_train_spp_classifier
    from spp_detect.classification.train import TrainSettings

    if score_set is not None and params["voc_root"] is None:
        raise click.UsageError("--score-set scores a VOC image set: give --voc-root")
    voc_root, year = params["voc_root"], params["year"]
    with stage_errors():
        images = _images(params)
        settings = settings_from_params(TrainSettings, params, seed="train_seed")
        summary = run_train_spp_classifier(
            images, out, settings, device=pick_device(device), force=force, score_set=score_set or "test",
            score=labelled_images(voc_root, year, score_set) if score_set is not None else None,
            progress=bar("batch", leave=False),
            on_epoch=lambda e, s, loss: click.echo(f"epoch {e + 1}/{settings.epochs}: size {s}, loss {loss:.4f}"))
    click.echo(summary.describe(out))


#: registered on the group by cli.py, in this order
COMMANDS = (classify_features_cmd, train_classifier_cmd, train_spp_classifier_cmd)
