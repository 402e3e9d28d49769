"""Users' own data through the detector: COCO json datasets with their own class lists, and
a trained model folder that detects on plain images (``spp_detect.model``)."""

from __future__ import annotations

from pathlib import Path
import json
import shutil

import numpy as np
import pytest
import torch

from eval.coco import evaluate_coco_json
from eval.voc import evaluate_voc
from spp_detect.cache import FeatureCache
from spp_detect.datasets import open_dataset
from spp_detect.detect import DetectSettings, load_detections, run_detect
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.finetune import FinetuneSettings, run_finetune
from spp_detect.head import load_head
from spp_detect.window_features import open_caches
from svm.train import SVMSettings, load_svm, run_train_svm
from tests.coco_data import RELABEL, THREE_CLASSES, image_list, write_coco
from tests.conftest import SQUEEZENET_FILE, jittered_proposals, proposals_mat

pytestmark = pytest.mark.usefixtures("one_thread")

SCALES = (240,)


def _train_and_detect(train, test, root):
    """extract -> finetune -> train-svm (fc7, box regression) -> detect, as the CLI runs them."""
    settings = ExtractSettings(backbone="squeezenet1_0", weights=str(SQUEEZENET_FILE), scales=SCALES)
    for split, data in (("train", train), ("test", test)):
        windows = jittered_proposals(data.images, seed=None, copies=4)  # seeded per image: both routes alike
        run_extract(data.images, proposals_mat(windows, root / f"p-{split}"), root / split, settings, image_set=data.name,
                    device=torch.device("cpu"), classes=data.classes)
    run_finetune([root / "train"], root / "head",
                 FinetuneSettings(fc_dim=32, iterations=20, round_iterations=10, batch_size=32))
    run_train_svm([root / "train"], root / "svm", SVMSettings(layer="fc7", C=0.1, bbox=True), head_folder=root / "head")
    run_detect(root / "test", root / "svm", root / "dets", DetectSettings(bbox=True))
    return root


@pytest.fixture(scope="module")
def routes(voc_root, tmp_path_factory):
    """The same 6 trainval -> 2 test images through the VOC route and through a COCO json
    written from the VOC XML by the tests' own code."""
    base = tmp_path_factory.mktemp("routes")
    jpegs = voc_root / "VOC2007" / "JPEGImages"
    train_ids, test_ids = image_list(voc_root, "trainval")[:6], image_list(voc_root, "test")[:2]
    voc = _train_and_detect(open_dataset(voc_root=voc_root, image_set="trainval", limit=6),
                            open_dataset(voc_root=voc_root, image_set="test", limit=2), base / "voc")
    coco = _train_and_detect(
        open_dataset(coco_json=write_coco(voc_root, train_ids, base / "train.json"), images=[jpegs]),
        open_dataset(coco_json=write_coco(voc_root, test_ids, base / "test.json"), images=[jpegs]), base / "coco")
    return voc, coco, test_ids


def test_coco_route_gives_the_voc_routes_detections_bit_for_bit(routes):
    voc, coco, test_ids = routes
    assert FeatureCache(coco / "train").classes == FeatureCache(voc / "train").classes
    for name in ("head/head.npz", "svm/svm.npz", "svm/bbox.npz"):
        assert (voc / name).read_bytes() == (coco / name).read_bytes(), name
    assert sorted(p.stem for p in (coco / "dets").glob("0*.npz")) == test_ids
    counts = 0
    for image_id in test_ids:
        a, b = (voc / "dets" / f"{image_id}.npz").read_bytes(), (coco / "dets" / f"{image_id}.npz").read_bytes()
        assert a == b, image_id
        counts += len(np.load(voc / "dets" / f"{image_id}.npz")["scores"])
    assert counts > 0


@pytest.fixture(scope="module")
def three_classes(voc_root, tmp_path_factory):
    """10 trainval -> 4 test images relabelled to animal / vehicle / person (category ids
    7, 3, 12; 000121 has none of them: an image without objects)."""
    base = tmp_path_factory.mktemp("three")
    jpegs = voc_root / "VOC2007" / "JPEGImages"
    train_json = write_coco(voc_root, image_list(voc_root, "trainval")[:10], base / "train.json", RELABEL, THREE_CLASSES)
    test_json = write_coco(voc_root, image_list(voc_root, "test")[:4], base / "test.json", RELABEL, THREE_CLASSES)
    train = open_dataset(coco_json=train_json, images=[jpegs])
    test = open_dataset(coco_json=test_json, images=[jpegs])
    assert train.notes == "0 box(es) clipped to the image, 0 zero-size box(es) dropped, 1 image(s) without objects"
    return _train_and_detect(train, test, base / "run"), test, test_json


def test_three_class_dataset_trains_four_way_fc8_and_three_svms(three_classes):
    root, test, _ = three_classes
    assert FeatureCache(root / "train").classes == ("vehicle", "animal", "person")
    assert load_head(root / "head").fc8.out_features == 4
    model = load_svm(root / "svm")
    assert model.classes == ("vehicle", "animal", "person") and tuple(model.weights.shape[1:]) == (3,)
    assert json.loads((root / "svm" / "svm.json").read_text())["classes"] == ["vehicle", "animal", "person"]
    labels = np.concatenate([np.load(p)["labels"] for p in sorted((root / "dets").glob("0*.npz"))])
    assert len(labels) > 0 and set(labels.tolist()) <= {0, 1, 2}
    # the devkit AP runs on the COCO images with their own classes
    dets = {name: d for name, d in _class_detections(root, test.classes).items()}
    result = evaluate_voc(dets, test.images, classes=test.classes)
    assert set(result.ap) == {"vehicle", "animal", "person"}


def _class_detections(root, classes):

    return load_detections(root / "dets", classes)


def test_evaluate_coco_json_agrees_with_pycocotools_by_hand(three_classes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root, test, test_json = three_classes
    result = evaluate_coco_json(_class_detections(root, test.classes), test_json)

    gt = COCO(str(test_json))
    ids = {im["file_name"][:-4]: im["id"] for im in gt.dataset["images"]}
    category = [3, 7, 12]  # vehicle, animal, person
    by_hand = []
    for path in sorted((root / "dets").glob("0*.npz")):
        data = np.load(path)
        for box, score, label in zip(data["boxes"].astype(np.float64), data["scores"], data["labels"]):
            by_hand.append({"image_id": ids[path.stem], "category_id": category[label],
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)})
    coco_eval = COCOeval(gt, gt.loadRes(by_hand), iouType="bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    assert list(result.stats.values()) == [float(v) for v in coco_eval.stats]
    assert list(result.ap) == ["vehicle", "animal", "person"]


def test_caches_with_other_class_lists_are_refused_naming_the_difference(routes, three_classes):
    voc, _, _ = routes
    root, _, _ = three_classes
    with pytest.raises(ValueError) as info:
        open_caches([voc / "train", root / "train"])
    message = str(info.value)
    assert "have other class lists" in message and "extra ['animal', 'vehicle']" in message
    assert "missing ['aeroplane', 'bicycle'" in message
    with pytest.raises(ValueError, match="classes differ"):
        run_detect(voc / "test", root / "svm", root / "wrong", DetectSettings())


def test_pooling_leaves_the_torch_thread_count_alone():
    """numba's first OpenMP launch reset the process's thread count, so the conv maps of an
    image extracted after some pooling (predict, a second route in one process) differed in
    their last bits from those extracted before. A fresh process, as the first pooling."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1); from spp_detect.spp import spatial_pyramid_pool; "
            "spatial_pyramid_pool(torch.rand(8, 10, 10), torch.tensor([[0, 0, 3, 3]]), (1, 2, 3, 6)); "
            "print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "1"


def test_a_broken_image_stops_extract_keeping_what_was_done_and_skip_bad_skips_it(voc_root, tmp_path):
    from spp_detect.images import ImageReadError

    folder = tmp_path / "images"
    folder.mkdir()
    ids = ["000001", "000015", "000040"]
    for image_id in ids:
        shutil.copy(voc_root / "VOC2007" / "JPEGImages" / f"{image_id}.jpg", folder / f"{image_id}.jpg")
    data = (folder / "000015.jpg").read_bytes()
    (folder / "000015.jpg").write_bytes(data[: len(data) // 2])  # cut short, as a failed upload
    dataset = open_dataset(coco_json=write_coco(voc_root, ids, tmp_path / "d.json"), images=[folder])
    settings = ExtractSettings(backbone="squeezenet1_0", weights=str(SQUEEZENET_FILE), scales=SCALES)
    out = tmp_path / "cache"

    def extract(**kwargs):
        windows = jittered_proposals(dataset.images, seed=None, copies=4)
        return run_extract(dataset.images, proposals_mat(windows, Path(f"{out}-proposals")), out, settings, image_set=dataset.name,
                           device=torch.device("cpu"), classes=dataset.classes, **kwargs)

    with pytest.raises(ImageReadError, match=r"000015.jpg: truncated or corrupt JPEG"):
        extract()
    first = (out / "000001.npz").stat().st_mtime_ns  # computed before the failure: kept
    summary = extract(skip_bad=True)
    assert (summary.skipped, summary.done, [e.path.name for e in summary.bad]) == (1, 1, ["000015.jpg"])
    assert (out / "000001.npz").stat().st_mtime_ns == first
    assert FeatureCache(out).image_ids == ["000001", "000040"]


def test_devkit_ap_on_a_coco_export_of_voc_equals_the_voc_numbers(routes, voc_root):
    voc, _, test_ids = routes
    dets = _class_detections(voc, tuple(FeatureCache(voc / "test").classes))
    on_voc = evaluate_voc(dets, open_dataset(voc_root=voc_root, image_set="test", limit=2).images)
    coco = open_dataset(coco_json=write_coco(voc_root, test_ids, voc / "t.json"),
                        images=[voc_root / "VOC2007" / "JPEGImages"])
    on_coco = evaluate_voc(dets, coco.images, classes=coco.classes)
    assert on_coco.map == on_voc.map and list(on_coco.ap) == list(on_voc.ap)
    assert np.array_equal(list(on_coco.ap.values()), list(on_voc.ap.values()), equal_nan=True)  # NaN: no object
    assert any(v > 0 for v in on_voc.ap.values() if v == v)
