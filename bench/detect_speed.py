"""Benchmark: per-image cost of ``detect`` against the bare conv + fc work and R-CNN-style.

On ``--images`` VOC2007 test images with ~2,000 windows each (the paper's selective search
fast mode, padded with OpenCV's fast-mode boxes where an image has fewer, as the issue
asks), at 1 scale (688) and 5 scales, all side by side in one run:

* bare conv: resize + normalise + the conv trunk, per image (maps kept in memory);
* extract stage: the whole ``extract`` (image read, conv, cache write);
* ``detect`` (``run_detect`` on that cache, the product's path): map decode, pooling,
  fc6 + fc7, SVM scores, NMS (+ thresholds), and its total per image;
* bare fc: fc6 + fc7 of the head on the pooled features of the distinct windows (the
  windows ``detect`` really runs), already in memory;
* R-CNN-style with the same head: each window cropped with 16 px of context, warped to
  224, run through the trunk, its map pooled whole with the same pyramid, fc6 + fc7, SVM
  scores (``extract --mode crop-warp``'s path). Timed on ``--rcnn-windows`` random windows
  per image and scaled linearly to the window count (its cost is linear in it); NMS is
  counted as SPP's.

The model (head fc 1,024 + fc7 SVMs with box regression) is trained first on
``--train-images`` trainval images (keyed stage folders under ``--work``, reused by a
rerun): its accuracy does not matter here, only its shape and a realistic score
distribution for NMS. ``--model`` takes any train-svm folder instead.

Also checked in the same run: the scores ``detect`` computes equal, value for value, those
of the plain path (torchvision ``roi_pool`` on every window, whole matrices, no buffer);
and ``detect --precision bf16`` is timed on the ~2,000-window caches
(``detect_s_*_bf16``; its mAP cost is measured by ``bench.redetect --precision bf16``).

Ratios (JSON keys as the issue names them): ``pool_over_conv_1scale`` = pooling /
bare conv; ``total_over_conv_plus_fc_{1,5}scale`` = ``detect`` total / (bare conv + bare fc);
``end_to_end_over_conv_plus_fc_*`` = (bare conv + ``detect`` total) / (bare conv + bare fc);
``speedup_vs_rcnn_total_*`` = R-CNN-style per image / (extract stage + ``detect`` total),
at 2,000 windows and ``*_at_measured`` at the images' own selective-search count.

Defaults (5 test images, 10 trainval images, 64 R-CNN windows per image) take about
5 minutes on the 2-core CPU the first time (3 of them training the model), 2 on a rerun.

    python -m bench.detect_speed [--images 5] [--json bench/results/detect_speed.json]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (SQUEEZENET_FILE, VOC_ROOT, add_device_option, machine, print_table, proposals_file, smoke_args,
                          write_json)
from proposals.io import load_proposals
from proposals.run import ProposalSettings, run_proposals
from spp_detect.backbones import build_trunk, resolve_normalization
from spp_detect.cache import FeatureCache
from spp_detect.datasets import read_voc
from spp_detect.detect import DetectSettings, run_detect
from spp_detect.device import resolve_device
from spp_detect.extract import ExtractSettings, crop_warp_maps, run_extract
from spp_detect.image_trunk import conv_maps, load_image_rgb, prepare_trunk
from spp_detect.finetune import FinetuneSettings, run_finetune
from spp_detect.spp import PAPER_LEVELS, _pool_roi, spatial_pyramid_pool
from spp_detect.window_features import PoolBuffer, distinct_windows, window_scores
from spp_detect.windows import PAPER_SCALES
from svm.train import SVMSettings, load_svm, run_train_svm

SCALES = {"1scale": (688,), "5scale": PAPER_SCALES}
RCNN_CROP, RCNN_CONTEXT = 224, 16  # R-CNN rcnn_im_crop.m: warp with 16 px of context


def _proposals(work: Path, split: str, images, windows: int) -> dict[str, dict[str, np.ndarray]]:
    """Per image: ``measured`` (the paper's fast mode, all boxes) and ``padded`` (those, then
    OpenCV fast-mode boxes not already among them, up to ``windows``)."""
    found = {}
    for mode in ("fast", "opencv-fast"):
        folder = work / f"proposals-{split}-{mode}"
        if not all((folder / f"{im.image_id}.npy").is_file() for im in images):
            run_proposals(images, folder, ProposalSettings(mode=mode), {"year": "2007", "image_set": split},
                          workers=2)
        found[mode] = load_proposals(folder, [im.image_id for im in images])
    measured = {k: v[:windows] for k, v in found["fast"].items()}
    padded = {}
    for image_id, boxes in measured.items():
        extra = found["opencv-fast"][image_id]
        known = {tuple(b) for b in boxes.tolist()}
        extra = np.asarray([b for b in extra.tolist() if tuple(b) not in known], dtype=boxes.dtype).reshape(-1, 4)
        padded[image_id] = np.concatenate([boxes, extra])[:windows]
    return {"measured": measured, "padded": padded}


def _train_model(work: Path, images, windows: int, device: torch.device, iterations: int = 200) -> Path:
    """A small fc7 model with box regression (keyed folders under ``work``)."""
    measured = _proposals(work, "trainval", images, windows)["measured"]
    props = proposals_file(work / f"proposals-trainval-measured-{windows}.mat", measured)
    settings = ExtractSettings(backbone="squeezenet1_0", weights=str(SQUEEZENET_FILE), scales=(688,))
    cache = work / f"feat-trainval-{len(images)}"
    run_extract(images, props, cache, settings, image_set="trainval", device=device)
    head_dir = work / f"head-{len(images)}"
    run_finetune([cache], head_dir, FinetuneSettings(fc_dim=1024, iterations=iterations, base_lr=0.02,
                                                     lr_steps=(iterations * 3 // 4,)),
                 device=device)
    svm_dir = work / f"svm-fc7-{len(images)}"
    c = 1e-3 * 5011 / len(images)  # bench/detection.py: the release's C scaled to the training-set size
    run_train_svm([cache], svm_dir, SVMSettings(layer="fc7", C=c, bbox=True), head_folder=head_dir, device=device)
    return svm_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5, help="first N VOC07 test images")
    parser.add_argument("--windows", type=int, default=2000, help="windows per image (padded up to this)")
    parser.add_argument("--train-images", type=int, default=10, help="trainval images the bench model is trained on")
    parser.add_argument("--model", type=Path, default=None, help="a train-svm folder to use instead")
    parser.add_argument("--rcnn-windows", type=int, default=64, help="R-CNN-style windows timed per image")
    parser.add_argument("--train-iterations", type=int, default=200, help="fine-tuning iterations of the bench model")
    add_device_option(parser)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-detect-speed"))
    parser.add_argument("--json", type=Path, default=None)
    args = smoke_args(parser, images=1, windows=100, train_images=2, rcnn_windows=2, train_iterations=10)

    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    work = args.work
    t_start = time.perf_counter()
    model_dir = args.model or _train_model(work, read_voc(VOC_ROOT, "trainval")[: args.train_images], args.windows,
                                           device, args.train_iterations)
    model = load_svm(model_dir, device)
    head = model.head
    if head is None:
        parser.error(f"{model_dir} scores pooled features; the bench needs a model on fc6 or fc7 (with its head)")
    images = read_voc(VOC_ROOT, "test")[: args.images]
    props = _proposals(work, "test", images, args.windows)
    counts = {k: float(np.mean([len(v) for v in p.values()])) for k, p in props.items()}

    weights = str(SQUEEZENET_FILE)
    trunk = prepare_trunk(build_trunk("squeezenet1_0", weights), device)
    norm = resolve_normalization("squeezenet1_0", weights)
    pixels = [load_image_rgb(im.path) for im in images]
    conv_maps(trunk, norm, pixels[0], (688,), device)  # warm-up
    spatial_pyramid_pool(torch.zeros(1, 2, 2), torch.zeros((1, 4), dtype=torch.int64))  # load the compiled kernel
    res: dict[str, object] = {
        "machine": machine(), "device": str(device), "images": len(images), "backbone": "squeezenet1_0",
        "fc_dim": head.fc_dim, "layer": model.layer, "bbox": model.regressor is not None,
        "windows_per_image_padded": counts["padded"], "windows_per_image_measured": counts["measured"],
    }
    table: list[tuple[str, str]] = []
    for name, scales in SCALES.items():
        start = time.perf_counter()
        for image in pixels:
            conv_maps(trunk, norm, image, scales, device)
        sync()
        conv = (time.perf_counter() - start) / len(images)
        res[f"conv_s_{name}"] = conv
        settings = ExtractSettings(backbone="squeezenet1_0", weights=weights, scales=scales)
        for count_name, boxes in props.items():
            tag = f"{name}" if count_name == "padded" else f"{name}_at_measured"
            cache_dir = work / f"feat-test-{len(images)}-{name}-{count_name}"
            shutil.rmtree(cache_dir, ignore_errors=True)  # timed afresh every run
            windows = proposals_file(work / f"proposals-test-{count_name}-{args.windows}.mat", boxes)
            summary = run_extract(images, windows, cache_dir, settings, image_set="test", device=device)
            extract = summary.seconds / summary.done
            det_dir = work / f"dets-{name}-{count_name}"
            shutil.rmtree(det_dir, ignore_errors=True)
            det = run_detect(cache_dir, model_dir, det_dir, DetectSettings(bbox=True), device=device, model=model)
            per = {k: v / det.done for k, v in det.timings.items()}
            total = det.seconds / det.done
            fc, distinct = _bare_fc(FeatureCache(cache_dir), head, device)
            res[f"extract_s_{tag}"] = extract
            res[f"detect_s_{tag}"] = {**per, "total": total}
            res[f"bare_fc_s_{tag}"] = fc
            res[f"distinct_windows_{tag}"] = distinct
            res[f"total_over_conv_plus_fc_{tag}"] = total / (conv + fc)
            res[f"end_to_end_over_conv_plus_fc_{tag}"] = (conv + total) / (conv + fc)
            if count_name == "padded":  # the same, with detect --precision bf16 (fc6 + fc7 in bfloat16)
                bf16_dir = work / f"dets-{name}-{count_name}-bf16"
                shutil.rmtree(bf16_dir, ignore_errors=True)
                low = run_detect(cache_dir, model_dir, bf16_dir, DetectSettings(bbox=True, precision="bf16"), device=device,
                                 model=model)
                low_per = {k: v / low.done for k, v in low.timings.items()}
                low_total = low.seconds / low.done
                res[f"detect_s_{name}_bf16"] = {**low_per, "total": low_total}
                res[f"total_over_conv_plus_fc_{name}_bf16"] = low_total / (conv + fc)
                table.append((f"{tag}: detect --precision bf16: fc; total",
                              f"{low_per['fc'] * 1e3:8.1f} ms; {low_total:.3f} s ({low_total / (conv + fc):.2f}x conv + fp32 fc)"))
            if count_name == "padded":
                res[f"pool_over_conv_{name}"] = per["pool"] / conv
                res[f"extract_images_per_s_{name}"] = 1.0 / extract
                res[f"detect_images_per_s_{name}"] = 1.0 / total
                res[f"scores_equal_plain_path_{name}"] = _check_against_plain_path(FeatureCache(cache_dir), model, device)
            table += [
                (f"{tag}: windows (distinct)", f"{counts[count_name]:8.0f} ({distinct:.0f})"),
                (f"{tag}: bare conv / extract stage", f"{conv:8.3f} / {extract:.3f} s"),
                (f"{tag}: detect decode/pool/fc/score/nms",
                 " / ".join(f"{per[k] * 1e3:.1f}" for k in ("decode", "pool", "fc", "score", "nms")) + " ms"),
                (f"{tag}: detect total; bare fc", f"{total:8.3f} s; {fc:.3f} s"),
                (f"{tag}: detect / (conv + fc)", f"{total / (conv + fc):8.2f}x  (conv + detect: {(conv + total) / (conv + fc):.2f}x)"),
            ]
            if count_name == "padded":
                table.append((f"{tag}: pool / conv", f"{per['pool'] / conv:8.3f}"))

    # R-CNN-style with the same head: crop-warp-forward per window, pool, fc, SVM scores
    rng = np.random.default_rng(0)
    start, timed = time.perf_counter(), 0
    buffer = PoolBuffer()
    for image, im in zip(pixels, images):
        boxes = props["padded"][im.image_id]
        pick = np.sort(rng.choice(len(boxes), size=min(args.rcnn_windows, len(boxes)), replace=False))
        tiled, cells = crop_warp_maps(trunk, norm, image, torch.from_numpy(boxes[pick]), RCNN_CROP, RCNN_CONTEXT, device)
        pooled = spatial_pyramid_pool(tiled, cells, PAPER_LEVELS, out=buffer.get(len(cells), tiled.shape[0] * 50, device))
        model.scores(head.features(pooled, model.layer, overwrite_input=True), overwrite_input=True)
        timed += len(pick)
    sync()
    rcnn_window = (time.perf_counter() - start) / timed
    res["rcnn_style_s_per_window"] = rcnn_window
    res["rcnn_style_note"] = (f"crop-warp-forward + pool + fc + SVM scores timed on {timed} random windows "
                              f"({args.rcnn_windows} per image), scaled linearly; NMS counted as SPP's")
    for name in SCALES:
        for count_name in props:
            tag = name if count_name == "padded" else f"{name}_at_measured"
            det = res[f"detect_s_{tag}"]
            rcnn = rcnn_window * counts[count_name] + det["nms"]
            spp = res[f"extract_s_{tag}"] + det["total"]
            res[f"rcnn_style_s_per_image_{tag}"] = rcnn
            res[f"speedup_vs_rcnn_total_{tag}"] = rcnn / spp
            res[f"speedup_vs_rcnn_conv_plus_detect_{tag}"] = rcnn / (res[f"conv_s_{name}"] + det["total"])
            table.append((f"{tag}: speedup vs R-CNN-style (total)",
                          f"{rcnn / spp:8.1f}x  ({rcnn:.1f} s vs {spp:.3f} s per image)"))
    res["wall_seconds"] = time.perf_counter() - t_start
    print_table(table, f"detect per image vs bare conv + fc vs R-CNN-style (SqueezeNet, fc {head.fc_dim}, "
                       f"{device}, {torch.get_num_threads()} threads)")
    write_json(args.json, res)


@torch.inference_mode()
def _bare_fc(cache: FeatureCache, head, device: torch.device) -> tuple[float, float]:
    """Seconds of fc6 + fc7 on the pooled features of each image's distinct proposal windows
    (pooled beforehand, not timed), batches of 1,024 as ``detect`` runs them; and the mean
    number of distinct windows."""
    seconds, distinct = 0.0, 0
    for image in cache:
        proposals = torch.nonzero(~image.is_gt).flatten()
        first, _ = distinct_windows(image, proposals)
        pooled = image.features(proposals[first], device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for chunk in pooled.split(1024):
            head.features(chunk, "fc7", overwrite_input=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        distinct += len(first)
    return seconds / len(cache), distinct / len(cache)


@torch.inference_mode()
def _check_against_plain_path(cache: FeatureCache, model, device: torch.device) -> bool:
    """Whether ``detect``'s batched path gives the scores of the plain one: roi_pool over
    every window at its scale, the head on the whole matrix, no buffer (``allclose`` at
    1e-5: fc6's matrix product over batches of another size may round differently)."""
    for image in cache:
        windows = torch.nonzero(~image.is_gt).flatten()
        fast = window_scores(image, model.scores, model.layer, model.head, windows, device=device)
        pooled = torch.empty((len(windows), image.maps[0].shape[0] * 50), device=device)
        for k, fmap in enumerate(image.maps):
            rows = torch.nonzero(image.scale_index[windows] == k).flatten()
            pooled[rows.to(device)] = _pool_roi(fmap.contiguous().to(device), image.cells[windows[rows]].to(device),
                                                PAPER_LEVELS)
        plain = model.scores(model.head.features(pooled, model.layer))
        if not torch.allclose(fast, plain, rtol=1e-5, atol=1e-5):
            return False
    return True


if __name__ == "__main__":
    main()
