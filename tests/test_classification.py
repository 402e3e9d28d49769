"""Image classification pieces: the devkit classification AP, whole-image SPP features, SVMs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.voc import voc07_recall_thresholds
from eval.voc_cls import (
    evaluate_voc_cls,
    read_cls_results,
    voc_cls_ap,
    voc_cls_ground_truth,
    write_cls_results,
)
from spp_detect.backbones import build_trunk, resolve_normalization
from spp_detect.classification.features import FeatureSettings, image_features, pool_whole, view_image
from spp_detect.classification.svm import l2_normalize, train_svms
from spp_detect.datasets.image_folder import read_image_folder, split_per_class
from spp_detect.datasets.voc import VOC_CLASSES, VOCImage, read_voc
from spp_detect.image_trunk import load_image_rgb, prepare_trunk
from spp_detect.spp import spatial_pyramid_pool

from tests.conftest import SQUEEZENET_FILE

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_image(image_id: str, objects: list[tuple[int, bool]]) -> VOCImage:
    labels = np.array([c for c, _ in objects], dtype=np.int64)
    difficult = np.array([d for _, d in objects], dtype=bool)
    boxes = np.tile(np.array([[0, 0, 10, 10]], dtype=np.float32), (len(objects), 1))
    return VOCImage(image_id, None, 100, 100, boxes.reshape(-1, 4), labels, difficult)


# --------------------------------------------------------------------------- classification AP
def test_cls_ap_hand_computed_with_difficult_only_image():
    # Class 0 (aeroplane). Image "b" has only a difficult aeroplane: ignored (gt 0).
    # Image "f" is missing from the results: score -inf, ranked last.
    images = [
        fake_image("a", [(0, False), (0, True)]),  # gt 1
        fake_image("b", [(0, True), (3, False)]),  # gt 0
        fake_image("c", [(14, False)]),  # gt -1
        fake_image("d", [(0, False)]),  # gt 1
        fake_image("e", []),  # gt -1
        fake_image("f", [(0, False)]),  # gt 1
    ]
    gt = voc_cls_ground_truth(images)
    assert gt[:, 0].tolist() == [1, 0, -1, 1, -1, 1]
    assert gt[1, 3] == 1 and gt[2, 14] == 1 and (gt[4] == -1).all()
    scores = {name: {} for name in VOC_CLASSES}
    scores["aeroplane"] = {"a": 0.9, "b": 0.95, "c": 0.8, "d": 0.7, "e": 0.6}
    # Ranked: b(ignored) a(+) c(-) d(+) e(-) f(+): rec 0,1/3,1/3,2/3,2/3,1; prec 0,1,1/2,2/3,1/2,3/5.
    # 11-point: t=0..0.3 -> 1 (4x), t=0.4..0.6 -> 2/3 (3x), t=0.7..1 -> 3/5 (4x).
    expected = (4 * 1 + 3 * (2 / 3) + 4 * (3 / 5)) / 11
    result = evaluate_voc_cls(scores, images)
    assert result.ap["aeroplane"] == pytest.approx(expected, abs=1e-12)
    assert result.positives["aeroplane"] == 3
    column = np.array([[0.9], [0.95], [0.8], [0.7], [0.6], [-np.inf]])  # the same as a one-class score matrix
    assert evaluate_voc_cls(column, images, classes=("aeroplane",)).ap == {"aeroplane": pytest.approx(expected, abs=1e-12)}
    # Counting the difficult-only image as a negative would give 0.5 instead.
    as_negative = voc_cls_ap(np.array([0.9, 0.95, 0.8, 0.7, 0.6, -np.inf]), np.array([1, -1, -1, 1, -1, 1]))[0]
    assert as_negative == pytest.approx(0.5, abs=1e-12)
    # Area AP (VOC2010+): envelope 1 up to rec 1/3, 2/3 up to 2/3, 3/5 to 1.
    area = evaluate_voc_cls(scores, images, use_07_metric=False).ap["aeroplane"]
    assert area == pytest.approx(1 / 3 + (2 / 3) / 3 + (3 / 5) / 3, abs=1e-12)


def loop_cls_ap(scores: np.ndarray, gt: np.ndarray) -> float:
    """VOCevalcls.m written out with Python loops (stable ranking, 11 points)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    tp = fp = 0
    rec, prec = [], []
    for i in order:
        tp += gt[i] > 0
        fp += gt[i] < 0
        rec.append(tp / (gt > 0).sum())
        prec.append(tp / (tp + fp) if tp + fp else 0.0)
    ap = 0.0
    for t in voc07_recall_thresholds("devkit"):  # MATLAB's 0:0.1:1
        p = [pr for r, pr in zip(rec, prec) if r >= t]
        ap += (max(p) if p else 0.0) / 11
    return ap


def test_cls_ap_matches_loop_reference_on_real_labels_with_ties(voc_root):
    images = read_voc(voc_root, "test")
    gt = voc_cls_ground_truth(images)
    assert (gt == 0).any(), "the test split has difficult-only images"
    assert ((gt > 0).sum(0) >= 8).all()
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=gt.shape) + gt, 1)  # rounding makes ties
    result = evaluate_voc_cls(scores, images)
    for k, name in enumerate(VOC_CLASSES):
        assert result.ap[name] == pytest.approx(loop_cls_ap(scores[:, k], gt[:, k]), abs=1e-9)
    perfect = evaluate_voc_cls(gt.astype(float), images)
    assert perfect.map == pytest.approx(1.0, abs=1e-12)


def test_cls_result_files_round_trip(voc_root, tmp_path):
    images = read_voc(voc_root, "test")[:30]
    scores = np.random.default_rng(1).normal(size=(30, 20))
    write_cls_results(scores, [im.image_id for im in images], tmp_path, "test")
    assert (tmp_path / "comp1_cls_test_aeroplane.txt").read_text().splitlines()[0].split()[0] == images[0].image_id
    read = read_cls_results(tmp_path, "test")
    assert evaluate_voc_cls(read, images).map == pytest.approx(evaluate_voc_cls(scores, images).map, abs=1e-5)


# --------------------------------------------------------------------------- features
@pytest.fixture(scope="module")
def squeezenet():
    trunk = prepare_trunk(build_trunk("squeezenet1_0", SQUEEZENET_FILE), CPU)
    return trunk, resolve_normalization("squeezenet1_0", SQUEEZENET_FILE)


def test_views_shapes_and_centre_crop():
    image = np.arange(375 * 500 * 3, dtype=np.uint8).reshape(375, 500, 3)
    assert view_image(image, "full", 224).shape == (224, 299, 3)  # round(500 * 224 / 375)
    crop = view_image(image, "crop", 224)
    assert crop.shape == (224, 224, 3)
    full = view_image(image, "full", 224)
    assert np.array_equal(crop, full[:, 37:261])  # (299 - 224) // 2 = 37
    assert view_image(image, "crop", 256, 224).shape == (224, 224, 3)


def test_whole_map_pyramid_equals_spatial_pyramid_pool(squeezenet, voc_root):
    trunk, norm = squeezenet
    image = view_image(load_image_rgb(read_voc(voc_root, "test")[0].path), "full", 200)
    with torch.inference_mode():
        maps = trunk(norm(torch.from_numpy(image).permute(2, 0, 1)).unsqueeze(0))  # [1, 512, h, w]
    h, w = maps.shape[-2:]
    reference = spatial_pyramid_pool(maps[0].contiguous(), torch.tensor([[0, 0, w - 1, h - 1]]))
    assert torch.equal(pool_whole(maps), reference)
    # A plain net's fixed 3x3/2 pool5 on a 224 crop's 13 x 13 map has level 6's bins.
    square = torch.randn(2, 5, 13, 13)
    assert torch.equal(pool_whole(square, pooling="plain"), pool_whole(square, (6,)))
    wide = torch.randn(1, 5, 14, 14)  # 14 x 14 (MobileNetV2 at 224): 6 x 6 too, but other bins
    assert pool_whole(wide, pooling="plain").shape == (1, 5 * 36)
    assert not torch.equal(pool_whole(wide, pooling="plain"), pool_whole(wide, (6,)))


def test_full_view_feature_alone_equals_in_a_batch(squeezenet, voc_root):
    trunk, norm = squeezenet
    by_id = {im.image_id: im for im in read_voc(voc_root, "test")}
    # Three 500 x 375 images (one shape: one batch of 3) and a 353 x 500 one (its own batch).
    ids = ["000015", "000001", "000038", "000084"]
    pixels = [load_image_rgb(by_id[i].path) for i in ids]
    settings = FeatureSettings(weights=str(SQUEEZENET_FILE), view="full", size=224)
    batched = dict(image_features(trunk, norm, pixels, settings, CPU, batch_size=4))
    assert sorted(batched) == [0, 1, 2, 3]
    for index, image in enumerate(pixels):
        (alone,) = [v for _, v in image_features(trunk, norm, [image], settings, CPU)]
        assert alone.shape == (512 * 50,)
        np.testing.assert_allclose(batched[index], alone, rtol=1e-4, atol=1e-4 * float(np.abs(alone).max()))
    assert not np.allclose(batched[0], batched[2])


# --------------------------------------------------------------------------- SVMs
def test_svms_ignore_label_zero_and_separate_separable_data():
    rng = np.random.default_rng(0)
    labels = rng.choice([-1, 1], size=(60, 3)).astype(np.int8)
    labels[:5, 0] = 0
    features = rng.normal(size=(60, 8)).astype(np.float32)
    features[:, :3] += 3.0 * labels  # class k is visible in dimension k
    classes = ("a", "b", "c")
    first = train_svms(features, labels, classes)
    changed = features.copy()
    changed[:5] = rng.normal(size=(5, 8)) * 100  # rows ignored by class 0 only
    second = train_svms(changed, labels, classes)
    np.testing.assert_allclose(first.weights[0], second.weights[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(first.weights[1], second.weights[1])
    scores = first.scores(features)
    assert ((scores > 0) == (labels > 0))[labels != 0].mean() == 1.0
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(features), axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="class 'a'"):
        train_svms(features, np.ones_like(labels), classes)


def test_image_folder_reader_and_paper_split(tmp_path):
    import cv2

    for name, count in (("cat", 5), ("BACKGROUND_Google", 3), ("ant", 4)):
        (tmp_path / name).mkdir()
        for i in range(count):
            cv2.imwrite(str(tmp_path / name / f"image_{i:04d}.jpg"), np.full((8, 8, 3), i, np.uint8))
    (tmp_path / "empty").mkdir()
    images, classes = read_image_folder(tmp_path)
    assert classes == ("BACKGROUND_Google", "ant", "cat") and len(images) == 12
    assert images[3].image_id == "ant/image_0000" and images[3].label == 1
    train = split_per_class(images, "train", train_per_class=2, test_per_class=2, seed=3)
    test = split_per_class(images, "test", train_per_class=2, test_per_class=2, seed=3)
    assert len(train) == 6 and not {i.image_id for i in train} & {i.image_id for i in test}
    assert [i.label for i in test] == [0, 1, 1, 2, 2]  # only 1 image left for class 0
