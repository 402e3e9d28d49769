"""The classification stages as the command line runs them: the labelled images of a VOC
set or an image folder, ``train-classifier`` (linear SVMs on ``classify-features`` output,
scored into devkit files) and ``train-spp-classifier`` (end-to-end training, then both
test views scored)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from spp_detect.stage_dir import Progress

if TYPE_CHECKING:
    from spp_detect.classification.svm import ClassifierSettings
    from spp_detect.classification.train import TrainSettings

__all__ = ["LabelledImages", "labelled_images", "write_scores", "ClassifierSummary", "run_train_classifier",
           "run_train_spp_classifier"]


@dataclass
class LabelledImages:
    """``ids``, ``paths``, ``labels`` (``np.ndarray[N, K]`` int8 in ``{1, 0, -1}``),
    ``classes`` and ``dataset`` (what keys a stage folder made from them)."""

    ids: list[str]
    paths: list[Path]
    labels: np.ndarray
    classes: tuple[str, ...]
    dataset: dict[str, object]


def labelled_images(voc_root: Path | None, year: str, image_set: str, image_folder: Path | None = None,
                    split: str = "train", train_per_class: int = 30, test_per_class: int = 50, seed: int = 0,
                    limit: int | None = None) -> LabelledImages:
    """A VOC image set (``voc_root``) or a per-class split of a ``<class>/<image>`` folder
    (``image_folder``, e.g. Caltech101: 30 train / up to 50 test images per class, paper 3.3)."""
    if image_folder is not None:
        from spp_detect.datasets.image_folder import read_image_folder, split_per_class

        everything, classes = read_image_folder(image_folder)
        images = split_per_class(everything, split, train_per_class, test_per_class, seed)[:limit]
        labels = np.full((len(images), len(classes)), -1, dtype=np.int8)
        labels[np.arange(len(images)), [im.label for im in images]] = 1
        dataset = {"image_folder": str(image_folder), "split": split, "train_per_class": train_per_class,
                   "test_per_class": test_per_class, "seed": seed, "limit": limit}
        return LabelledImages([im.image_id for im in images], [im.path for im in images], labels, tuple(classes), dataset)
    from eval.voc_cls import voc_cls_ground_truth
    from spp_detect.datasets.voc import VOC_CLASSES, read_voc

    images = read_voc(voc_root, image_set, year)[:limit]
    dataset = {"voc_year": year, "image_set": image_set, "limit": limit}
    return LabelledImages([im.image_id for im in images], [im.path for im in images], voc_cls_ground_truth(images),
                          VOC_CLASSES, dataset)


def write_scores(scores: np.ndarray, image_ids, classes, folder: Path, image_set: str, labels: np.ndarray) -> str:
    """Write devkit score files (``comp1_cls_<set>_<class>.txt``) of ``scores [N, K]``; returns
    a one-line summary (with accuracy when every image has exactly one label)."""
    from eval.voc_cls import write_cls_results

    write_cls_results(scores, image_ids, folder, image_set, classes=classes)
    line = f"wrote {len(classes)} score files to {folder}"
    if len(labels) and ((labels == 1).sum(1) == 1).all():
        truth = labels.argmax(1)
        per_class = [float((scores[truth == k].argmax(1) == k).mean()) for k in np.unique(truth)]
        line += f"; accuracy {float((scores.argmax(1) == truth).mean()):.4f}, mean per-class {np.mean(per_class):.4f}"
    return line


@dataclass
class ClassifierSummary:
    """What a classifier stage did, as the lines a command prints (``trained``: what was
    trained; ``scored``: one line per set of scores written, with its accuracy)."""

    trained: str
    scored: list[str] = field(default_factory=list)

    def describe(self, out: Path | str | None = None) -> str:
        """The lines a command prints (``out`` is named in them already)."""
        return "\n".join([self.trained, *self.scored])


def run_train_classifier(features_dir: Path, out: Path, settings: ClassifierSettings | None = None, *,
                         score: Path | None = None, scores_out: Path | None = None) -> ClassifierSummary:
    """Train one linear SVM per class on the features of ``features_dir`` into ``out``
    (``.npz``); with ``score`` and ``scores_out``, score those features into devkit files.

    Raises:
        FileNotFoundError: an unfinished features folder; ValueError: ``score`` made with
            other feature settings or classes.
    """
    from spp_detect.classification.features import load_features
    from spp_detect.classification.svm import ClassifierSettings, save_classifier, train_svms

    settings = settings or ClassifierSettings()
    train = load_features(features_dir)
    classifier = train_svms(train.features, train.labels, train.classes, settings, {"features": train.config})
    save_classifier(out, classifier)
    summary = ClassifierSummary(f"trained {len(train.classes)} linear SVMs on {len(train.image_ids)} images "
                                f"({train.features.shape[1]}-d, C={settings.C:g}) -> {out}")
    if score is not None:
        test = load_features(score)
        if test.classes != train.classes:
            raise ValueError(f"{score} has other classes than {features_dir}")
        features_only = lambda config: {k: v for k, v in config.items() if k != "dataset"}  # noqa: E731
        if features_only(test.config) != features_only(train.config):
            raise ValueError(f"{score} was computed with other feature settings than {features_dir}")
        dataset = test.config.get("dataset", {})
        image_set = str(dataset.get("image_set") or dataset.get("split"))
        summary.scored.append(write_scores(classifier.scores(test.features), test.image_ids, test.classes, scores_out,
                                           image_set, test.labels))
    return summary


def run_train_spp_classifier(images: LabelledImages, out: Path, settings: TrainSettings, *, device, force: bool = False,
                             score: LabelledImages | None = None, score_set: str = "test",
                             progress: Progress | None = None,
                             on_epoch: Callable[[int, int, float], None] | None = None) -> ClassifierSummary:
    """Train an SPP classifier (:func:`spp_detect.classification.train.run_training`) on
    ``images`` in the stage folder ``out``; with ``score``, score those images at both test
    views into ``out/scores-<view>-<score_set>/``."""
    from spp_detect.backbones import resolve_normalization
    from spp_detect.classification.train import load_trained, predict, run_training
    from spp_detect.image_trunk import load_image_rgb

    norm = resolve_normalization(settings.backbone, settings.weights, settings.input_norm)
    pixels = [load_image_rgb(p) for p in images.paths]
    state = run_training(pixels, images.labels, images.classes, out, settings, norm, device, dataset=images.dataset,
                         force=force, progress=progress, on_epoch=on_epoch)
    resumed = f" (resumed after epoch {state.resumed_from})" if state.resumed_from else ""
    summary = ClassifierSummary(f"trained {len(state.losses) - state.resumed_from} epoch(s){resumed} -> {out}")
    if score is not None:
        model = load_trained(out, settings, len(images.classes), device)
        test_pixels = [load_image_rgb(p) for p in score.paths]
        for view in ("crop", "full"):
            scores = predict(model, norm, test_pixels, view, device, size=settings.resize, crop=settings.crop)
            folder = Path(out) / f"scores-{view}-{score_set}"
            summary.scored.append(f"{view} view: " + write_scores(scores, score.ids, images.classes, folder, score_set,
                                                                  score.labels))
    return summary
