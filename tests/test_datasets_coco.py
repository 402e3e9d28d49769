"""COCO datasets, plain image folders and the dataset registry, on real voc2007-mini files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from spp_detect.datasets import COCOFormatError, DatasetError, open_dataset, read_coco, read_voc
from spp_detect.datasets.image_folder import read_images
from spp_detect.datasets.registry import class_difference
from spp_detect.images import ImageReadError
from tests.coco_data import RELABEL, THREE_CLASSES, VOC_NAMES, image_list, write_coco


def _jpegs(voc_root):
    return voc_root / "VOC2007" / "JPEGImages"


def test_coco_from_voc_xml_reads_as_the_voc_reader_does(voc_root, tmp_path):
    ids = image_list(voc_root, "trainval")[:12]
    data = read_coco(write_coco(voc_root, ids, tmp_path / "voc.json"), _jpegs(voc_root))
    assert data.classes == VOC_NAMES and data.category_ids == tuple(range(1, 21))
    voc = read_voc(voc_root, "trainval", limit=12)
    assert [im.image_id for im in data.images] == [im.image_id for im in voc] == ids
    assert [im.coco_id for im in data.images] == list(range(100, 112))
    for a, b in zip(data.images, voc):
        assert (a.path, a.width, a.height) == (b.path, b.width, b.height)
        assert a.boxes.dtype == np.float32 and np.array_equal(a.boxes, b.boxes)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.difficult, b.difficult)
    assert (data.stats.clipped, data.stats.dropped, data.stats.empty_images) == (0, 0, 0)
    assert sum(im.difficult.sum() for im in data.images) > 0  # iscrowd read as difficult


def test_class_list_is_the_categories_in_id_order(voc_root, tmp_path):
    ids = image_list(voc_root, "trainval")[:10]
    data = read_coco(write_coco(voc_root, ids, tmp_path / "three.json", RELABEL, THREE_CLASSES), _jpegs(voc_root))
    assert data.classes == ("vehicle", "animal", "person") and data.category_ids == (3, 7, 12)
    voc = read_voc(voc_root, "trainval", limit=10)
    for a, b in zip(data.images, voc):
        names = [RELABEL.get(VOC_NAMES[label]) for label in b.labels]
        kept = [n is not None for n in names]
        assert np.array_equal(a.boxes, b.boxes[kept])
        assert [data.classes[label] for label in a.labels] == [n for n in names if n is not None]


def _odd(voc_root, tmp_path, annotations, images=None, categories=None):
    images = images or [{"id": 1, "file_name": "000015.jpg", "width": 500, "height": 375},
                        {"id": 2, "file_name": "000016.jpg", "width": 334, "height": 500}]
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories or [{"id": 1, "name": "chair"}, {"id": 2, "name": "car"}]}))
    return path


def test_box_past_the_edge_is_clipped_and_zero_size_dropped_and_counted(voc_root, tmp_path):
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [-4.5, 10, 100, 50]},      # past the left edge
        {"id": 12, "image_id": 1, "category_id": 2, "bbox": [450, 300, 80, 100]},      # past right and bottom
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [20, 30, 0, 40]},          # zero width
        {"id": 14, "image_id": 1, "category_id": 2, "bbox": [600, 10, 30, 30]},        # wholly outside: zero after clipping
        {"id": 15, "image_id": 1, "category_id": 1, "bbox": [5, 6, 7, 8], "iscrowd": 1},
    ]
    data = read_coco(_odd(voc_root, tmp_path, anns), _jpegs(voc_root))
    first, second = data.images
    assert np.array_equal(first.boxes, np.array([[0, 10, 95.5, 60], [450, 300, 500, 375], [5, 6, 12, 14]], np.float32))
    assert first.labels.tolist() == [0, 1, 0] and first.difficult.tolist() == [False, False, True]
    assert (data.stats.clipped, data.stats.dropped, data.stats.empty_images) == (2, 2, 1)
    assert data.stats.examples == {"clipped": [11, 12], "dropped": [13, 14]}
    # the image without objects is an ordinary image with empty arrays
    assert second.image_id == "000016" and second.boxes.shape == (0, 4) and second.labels.shape == (0,)
    assert data.stats.describe() == ("2 box(es) clipped to the image (annotation ids 11, 12), "
                                     "2 zero-size box(es) dropped (annotation ids 13, 14), 1 image(s) without objects")


def test_unknown_category_is_one_line_naming_file_and_object(voc_root, tmp_path):
    anns = [{"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
            {"id": 12, "image_id": 2, "category_id": 9, "bbox": [1, 2, 3, 4]}]
    path = _odd(voc_root, tmp_path, anns)
    with pytest.raises(COCOFormatError) as info:
        read_coco(path, _jpegs(voc_root))
    assert str(info.value) == (f"{path}: annotation id 12 of image '000016.jpg': unknown category_id 9 "
                               "(categories: [1, 2])")
    assert "\n" not in str(info.value)
    # --skip-bad: the image is left out and listed, the other read
    data = read_coco(path, _jpegs(voc_root), skip_bad=True)
    assert [im.image_id for im in data.images] == ["000015"]
    assert [e.image_id for e in data.bad] == ["000016"]


def test_other_malformed_entries_name_their_file(voc_root, tmp_path):
    anns = [{"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 2, -3, 4]}]
    with pytest.raises(COCOFormatError, match=r"odd.json: annotation id 11 of image '000015.jpg': bbox .* negative"):
        read_coco(_odd(voc_root, tmp_path, anns), _jpegs(voc_root))
    anns = [{"id": 11, "image_id": 5, "category_id": 1, "bbox": [1, 2, 3, 4]}]
    with pytest.raises(COCOFormatError, match="annotation id 11 refers to image_id 5, which is not in 'images'"):
        read_coco(_odd(voc_root, tmp_path, anns), _jpegs(voc_root))
    missing = [{"id": 1, "file_name": "nope.jpg", "width": 10, "height": 10}]
    with pytest.raises(COCOFormatError, match=r"image 'nope.jpg' \(id 1\): image file not found"):
        read_coco(_odd(voc_root, tmp_path, [], images=missing), _jpegs(voc_root))
    twice = [{"id": 1, "file_name": "a/x.jpg", "width": 10, "height": 10}, {"id": 2, "file_name": "b/x.jpg", "width": 10, "height": 10}]
    with pytest.raises(COCOFormatError, match="same name stem 'x'"):
        read_coco(_odd(voc_root, tmp_path, [], images=twice), _jpegs(voc_root))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(COCOFormatError, match="bad.json: not valid json"):
        read_coco(tmp_path / "bad.json", _jpegs(voc_root))


def test_plain_images_from_folder_and_files(voc_root, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("000015.jpg", "000001.jpg"):
        shutil.copy(_jpegs(voc_root) / name, folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        read_images([folder])
    bad: list = []
    images = read_images([folder, _jpegs(voc_root) / "000016.jpg"], bad=bad)
    assert [(im.image_id, im.width, im.height) for im in images] == [("000001", 353, 500), ("000015", 500, 375),
                                                                     ("000016", 334, 500)]
    assert images[0].boxes.shape == (0, 4) and [e.path.name for e in bad] == ["broken.jpg"]
    with pytest.raises(ValueError, match="same name stem '000015'"):
        read_images([folder / "000015.jpg", _jpegs(voc_root) / "000015.jpg"])


def test_registry_picks_the_source_from_the_options(voc_root, tmp_path):
    ids = image_list(voc_root, "test")[:3]
    coco = open_dataset(coco_json=write_coco(voc_root, ids, tmp_path / "t.json"), images=[_jpegs(voc_root)])
    assert (coco.kind, coco.name, coco.classes, len(coco.images)) == ("coco", "t", VOC_NAMES, 3)
    voc = open_dataset(voc_root=voc_root, image_set="test", limit=3)
    assert (voc.kind, voc.name, voc.classes) == ("voc", "test", VOC_NAMES)
    plain = open_dataset(images=[_jpegs(voc_root) / f"{i}.jpg" for i in ids])
    assert (plain.kind, plain.classes, plain.annotated, [im.image_id for im in plain.images]) == ("images", (), False, ids)
    with pytest.raises(DatasetError, match="not several"):
        open_dataset(voc_root=voc_root, images=[tmp_path])
    with pytest.raises(DatasetError, match="--coco-json needs --images DIR"):
        open_dataset(coco_json=tmp_path / "t.json")
    with pytest.raises(DatasetError, match="no images"):
        open_dataset()
    assert class_difference(("a", "b"), ("a", "b")) is None
    assert class_difference(("a", "b"), ("b", "a")) == "same classes in another order"
    assert class_difference(("a", "b"), ("a", "c")) == "missing ['b'], extra ['c']"
