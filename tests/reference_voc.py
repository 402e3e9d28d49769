"""Slow, obvious references for ``eval.voc``: line-by-line ports that read the files on disk.

* :func:`devkit_voc_eval` follows the official MATLAB ``VOCevaldet.m`` (VOCdevkit2007,
  copy at ShaoqingRen/SPP_net ``datasets/VOCdevkit2007/VOCcode/VOCevaldet.m``) statement by
  statement: annotations read from the XML files (1-based pixels as written), detections
  read from the devkit result file, a stable sort, a loop over detections and a loop over
  ground truth. ``0:0.1:1`` is built as MATLAB's colon operator builds it.
* :func:`py_faster_rcnn_voc_eval` is py-faster-rcnn's ``lib/datasets/voc_eval.py``
  (@ d66cc2b) in Python 3, without its annotation pickle.

Neither shares code with the package: they are what the vectorised version is pinned to.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np


def read_objects(xml_path: Path) -> list[dict]:
    """``PASreadrecord``: the objects of one annotation file, boxes 1-based as written."""
    objects = []
    for obj in ET.parse(xml_path).getroot().iter("object"):
        bndbox = obj.find("bndbox")
        objects.append(
            {
                "class": obj.findtext("name").strip(),
                "bbox": [float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")],
                "difficult": int(obj.findtext("difficult", default="0")) == 1,
            }
        )
    return objects


def matlab_colon(a: float, d: float, b: float) -> list[float]:
    """MATLAB's ``a:d:b`` for ``(b - a) / d`` integral: first half from ``a``, second half
    from ``b``, middle ``(a + b) / 2`` (MathWorks solution 1-4FLI96, colonop.m)."""
    n = round((b - a) / d)
    v = [0.0] * (n + 1)
    for k in range(n // 2 + 1):
        v[k] = a + k * d
        v[n - k] = b - k * d
    if n % 2 == 0:
        v[n // 2] = (a + b) / 2
    return v


def read_devkit_results(det_file: Path) -> tuple[list[str], list[float], list[list[float]]]:
    """``textread(..., '%s %f %f %f %f %f')``."""
    ids, confidence, bbs = [], [], []
    if det_file.is_file():
        for line in det_file.read_text().splitlines():
            if not line.strip():
                continue
            fields = line.split()
            ids.append(fields[0])
            confidence.append(float(fields[1]))
            bbs.append([float(v) for v in fields[2:6]])
    return ids, confidence, bbs


def devkit_voc_eval(det_file: Path, annotations_dir: Path, image_ids: list[str], cls: str,
                    minoverlap: float = 0.5, use_07_metric: bool = True):
    """``[rec, prec, ap] = VOCevaldet(VOCopts, id, cls)``; returns ``(rec, prec, ap)``.

    ``use_07_metric=False`` ends with the VOC2010+ devkit's ``VOCap(rec, prec)`` instead.
    ``prec`` keeps MATLAB's 0/0 = NaN; ``max`` skips NaN as MATLAB's ``max`` does.
    """
    # load ground truth objects
    gt = {}
    npos = 0
    for image_id in image_ids:
        objects = [o for o in read_objects(annotations_dir / f"{image_id}.xml") if o["class"] == cls]
        gt[image_id] = {
            "BB": [o["bbox"] for o in objects],
            "diff": [o["difficult"] for o in objects],
            "det": [False] * len(objects),
        }
        npos += sum(not d for d in gt[image_id]["diff"])

    # load results, sort by decreasing confidence ([sc, si] = sort(-confidence): stable)
    ids, confidence, bbs = read_devkit_results(det_file)
    si = sorted(range(len(confidence)), key=lambda k: -confidence[k])
    ids = [ids[k] for k in si]
    bbs = [bbs[k] for k in si]

    nd = len(confidence)
    tp = [0.0] * nd
    fp = [0.0] * nd
    for d in range(nd):
        if ids[d] not in gt:
            raise ValueError(f'unrecognized image "{ids[d]}"')
        g = gt[ids[d]]
        bb = bbs[d]
        ovmax = -np.inf
        jmax = -1
        for j, bbgt in enumerate(g["BB"]):
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
            iw = bi[2] - bi[0] + 1
            ih = bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = (
                    (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                    + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                    - iw * ih
                )
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax = ov
                    jmax = j
        if ovmax >= minoverlap:
            if not g["diff"][jmax]:
                if not g["det"][jmax]:
                    tp[d] = 1.0
                    g["det"][jmax] = True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / npos
    with np.errstate(invalid="ignore"):
        prec = tp / (fp + tp)

    if not use_07_metric:
        return rec, prec, devkit_vocap(rec, prec)
    ap = 0.0
    for t in matlab_colon(0.0, 0.1, 1.0):
        p = prec[(rec >= t) & ~np.isnan(prec)]
        p = p.max() if p.size else 0.0
        ap = ap + p / 11
    return rec, prec, ap


def devkit_vocap(rec: np.ndarray, prec: np.ndarray) -> float:
    """VOC2010+ devkit ``VOCap.m``, with 1-based MATLAB indices kept in the comments."""
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):  # for i=numel(mpre)-1:-1:1
        mpre[i] = float(np.fmax(mpre[i], mpre[i + 1]))  # MATLAB max skips NaN
    ap = 0.0
    for i in range(1, len(mrec)):  # i=find(mrec(2:end)~=mrec(1:end-1))+1
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def py_faster_rcnn_voc_eval(det_file: Path, annotations_dir: Path, image_ids: list[str], cls: str,
                            ovthresh: float = 0.5, use_07_metric: bool = True):
    """py-faster-rcnn ``voc_eval`` (Python 3, no cache file); returns ``(rec, prec, ap)``."""
    class_recs = {}
    npos = 0
    for imagename in image_ids:
        objects = [o for o in read_objects(annotations_dir / f"{imagename}.xml") if o["class"] == cls]
        bbox = np.array([o["bbox"] for o in objects])
        difficult = np.array([o["difficult"] for o in objects]).astype(bool)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(objects)}

    image_ids_det, confidence, bbs = read_devkit_results(det_file)
    confidence = np.array(confidence)
    BB = np.array(bbs).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence)
    BB = BB[sorted_ind, :]
    image_ids_det = [image_ids_det[x] for x in sorted_ind]

    nd = len(image_ids_det)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids_det[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0) + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (
                BBGT[:, 3] - BBGT[:, 1] + 1.0
            ) - inters
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
    else:
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return rec, prec, ap
