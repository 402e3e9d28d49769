"""The VOC reader on the real VOC2007 slice, and its errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from spp_detect.datasets import VOC_CLASSES, VOCFormatError, read_voc


def _counts(images):
    difficult = sum(int(im.difficult.sum()) for im in images)
    total = sum(len(im.labels) for im in images)
    return total - difficult, difficult


def test_reads_all_400_images_with_the_readme_counts(voc_root):
    trainval = read_voc(voc_root, "trainval")
    test = read_voc(voc_root, "test")
    assert len(trainval) == 200 and len(test) == 200
    assert _counts(trainval) == (559, 126)
    assert _counts(test) == (551, 126)
    assert len(read_voc(voc_root, "train")) == 126 and len(read_voc(voc_root, "val")) == 74
    for split in (trainval, test):  # every class present, non-difficult, in both splits
        labels = np.concatenate([im.labels[~im.difficult] for im in split])
        assert set(labels.tolist()) == set(range(len(VOC_CLASSES)))


def test_boxes_are_converted_once_to_0_based(voc_root):
    image = next(im for im in read_voc(voc_root, "test") if im.image_id == "000001")
    assert (image.width, image.height) == (353, 500)
    # XML: dog 48 240 195 371, person 8 12 352 498 (1-based inclusive)
    assert image.boxes.tolist() == [[47, 239, 195, 371], [7, 11, 352, 498]]
    assert [VOC_CLASSES[k] for k in image.labels] == ["dog", "person"]
    assert image.difficult.tolist() == [False, False]
    assert image.path.is_file()
    for im in read_voc(voc_root, "test"):  # inside the image, positive size
        assert (im.boxes[:, :2] >= 0).all() and (im.boxes[:, 2] <= im.width).all() and (im.boxes[:, 3] <= im.height).all()
        assert (im.boxes[:, 2:] > im.boxes[:, :2]).all()


def _mini_voc(tmp_path, voc_root, ids=("000001", "000015")):
    src = voc_root / "VOC2007"
    dst = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True)
    for i in ids:
        shutil.copy(src / "Annotations" / f"{i}.xml", dst / "Annotations")
        shutil.copy(src / "JPEGImages" / f"{i}.jpg", dst / "JPEGImages")
    (dst / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    return dst


def test_errors_name_the_file(tmp_path, voc_root):
    root = _mini_voc(tmp_path, voc_root)
    xml = root / "Annotations" / "000015.xml"
    xml.write_text(xml.read_text().replace("<name>bicycle", "<name>flyingbike"))
    with pytest.raises(VOCFormatError, match=r"000015\.xml: unknown class name 'flying"):
        read_voc(tmp_path, "test")
    xml.write_text("<annotation><size><width>1</wid")
    with pytest.raises(VOCFormatError, match=r"000015\.xml: malformed"):
        read_voc(tmp_path, "test")
    (root / "JPEGImages" / "000001.jpg").unlink()
    with pytest.raises(VOCFormatError, match=r"image file not found: .*000001\.jpg"):
        read_voc(tmp_path, "test")
    with pytest.raises(VOCFormatError, match=r"image-set list not found: .*val\.txt"):
        read_voc(tmp_path, "val")
