"""Image classification commands (paper section 3)."""

from __future__ import annotations

from pathlib import Path

import click

from spp_detect.commands.options import (
    backbone_options,
    check_weights,
    device_option,
    force_option,
    image_source_options,
    parse_scales,
    pick_device,
)


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


@click.command("classify-features")
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
    from spp_detect.image_trunk import prepare_trunk
    from spp_detect.images import ImageReadError
    from spp_detect.stage_dir import SettingsChanged

    if image_folder is None and voc_root is None:
        raise click.UsageError("give --voc-root (VOC) or --image-folder (e.g. Caltech101)")
    check_weights(weights)
    torch_device = pick_device(device)
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


@click.command("train-classifier")
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
    from spp_detect.classification.svm import ClassifierSettings, save_classifier, train_svms

    if (score_dir is None) != (scores_out is None):
        raise click.UsageError("--score and --scores-out go together")
    try:
        train = load_features(features_dir)
        config = {"features": train.config}
        classifier = train_svms(train.features, train.labels, train.classes, ClassifierSettings(C=c), config)
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


@click.command("train-spp-classifier")
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
    from spp_detect.image_trunk import load_image_rgb
    from spp_detect.images import ImageReadError
    from spp_detect.stage_dir import SettingsChanged

    if image_folder is None and voc_root is None:
        raise click.UsageError("give --voc-root (VOC) or --image-folder (e.g. Caltech101)")
    if score_set is not None and voc_root is None:
        raise click.UsageError("--score-set scores a VOC image set: give --voc-root")
    check_weights(weights)
    torch_device = pick_device(device)
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


#: registered on the group by cli.py, in this order
COMMANDS = (classify_features_cmd, train_classifier_cmd, train_spp_classifier_cmd)
