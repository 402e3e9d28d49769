"""Benchmark: SPP extraction against the bare conv pass and against R-CNN-style extraction.

On ``--images`` VOC2007 test images with their selective-search proposals and the
SqueezeNet weights from ../shared/data, in one run:

* bare forward: resize + normalise + conv trunk at 1 scale (688) and at 5 scales;
* SPP extract: the whole ``extract`` stage (image read, conv, scale choice, cell mapping,
  fp16+deflate cache write) at 1 and 5 scales;
* SPP pooling: reading the cache and pooling every window (what later stages pay);
* R-CNN style: crop each window with 16 px of context (R-CNN's ``context_pad``), warp to
  224 x 224, run the trunk, pool the same pyramid over the crop's map. Timed on a random
  subset of ``--rcnn-windows`` windows per image and scaled linearly (its cost is linear
  in the window count);
* fp16 cache error: the largest relative error the cache puts into pooled features.

Speedups are given at 2,000 windows per image (R-CNN's setting) and at the measured mean
count: ``speedup_vs_rcnn_*`` is R-CNN-style extraction over the SPP extract stage (the
issue's definition; the stage writes conv maps, pooling happens when later stages read),
``speedup_vs_rcnn_incl_pooling_*`` adds SPP's pooling of every window on read, and
``conv_speedup_vs_rcnn_*`` compares bare conv time only (as the paper's Table 6 does).

    python -m bench.extract [--images 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import SQUEEZENET_FILE, VOC_ROOT, add_device_option, machine, print_table, smoke_args, write_json
from proposals.io import load_proposals
from proposals.run import ProposalSettings, run_proposals
from spp_detect.backbones import build_trunk, resolve_normalization
from spp_detect.cache import FeatureCache
from spp_detect.datasets import read_voc
from spp_detect.device import resolve_device
from spp_detect.extract import ExtractSettings, run_extract
from spp_detect.image_trunk import conv_maps, load_image_rgb, prepare_trunk
from spp_detect.spp import PAPER_LEVELS, spatial_pyramid_pool
from spp_detect.windows import PAPER_SCALES

RCNN_CONTEXT_PAD = 16  # R-CNN rcnn_im_crop.m: 16 px of context around each warped window
RCNN_INPUT = 224  # the warp size (R-CNN used 227 for AlexNet)


def rcnn_crops(image: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
    """R-CNN's warp with context: expand each box so that, once warped to ``RCNN_INPUT``,
    ``RCNN_CONTEXT_PAD`` pixels of context surround it; out-of-image parts are zero (the
    mean after normalisation in R-CNN; zero pixels here). Returns ``uint8 [B, 3, 224, 224]``."""
    import cv2

    scale = RCNN_INPUT / (RCNN_INPUT - 2 * RCNN_CONTEXT_PAD)
    crops = []
    for x1, y1, x2, y2 in boxes:  # bench-only baseline: one crop per window is its nature
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
        # affine warp of the expanded box onto the 224 x 224 crop, zero outside the image
        src = np.float32([[cx - hw, cy - hh], [cx + hw, cy - hh], [cx - hw, cy + hh]])
        dst = np.float32([[0, 0], [RCNN_INPUT, 0], [0, RCNN_INPUT]])
        warp = cv2.getAffineTransform(src, dst)
        crops.append(cv2.warpAffine(image, warp, (RCNN_INPUT, RCNN_INPUT), flags=cv2.INTER_LINEAR))
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)


@torch.inference_mode()
def rcnn_extract(trunk, norm, image: np.ndarray, boxes: np.ndarray, device, batch: int = 50) -> torch.Tensor:
    """R-CNN-style features for ``boxes``: crop-warp-forward-pool, ``[B, C * 50]``."""
    feats = []
    for start in range(0, len(boxes), batch):
        crops = rcnn_crops(image, boxes[start : start + batch]).to(device)
        maps = trunk(norm(crops).contiguous(memory_format=torch.channels_last)).contiguous()  # [b, C, h, w]
        h, w = maps.shape[-2:]
        whole = torch.tensor([[0, 0, w - 1, h - 1]], device=device)
        feats.append(torch.cat([spatial_pyramid_pool(m, whole, PAPER_LEVELS) for m in maps]))
    return torch.cat(feats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20, help="first N test images")
    parser.add_argument("--rcnn-windows", type=int, default=200, help="R-CNN windows timed per image")
    parser.add_argument("--proposals", type=Path, default=None, help="existing proposals folder (else computed)")
    add_device_option(parser, default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = smoke_args(parser, images=1, rcnn_windows=4)

    device = resolve_device(args.device)
    images = read_voc(VOC_ROOT, "test")[: args.images]
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    proposals_dir = args.proposals
    if proposals_dir is None:
        proposals_dir = work / "proposals"
        print(f"selective search (fast) on {len(images)} images -> {proposals_dir}")
        run_proposals(images, proposals_dir, ProposalSettings(), workers=2)
    proposals = load_proposals(proposals_dir, [im.image_id for im in images])
    counts = np.array([len(proposals[im.image_id]) + len(im.boxes) for im in images])
    mean_windows = float(counts.mean())

    weights = str(SQUEEZENET_FILE)
    trunk = prepare_trunk(build_trunk("squeezenet1_0", weights), device)  # channels-last, as extract runs it
    norm = resolve_normalization("squeezenet1_0", weights)
    pixels = [load_image_rgb(im.path) for im in images]
    conv_maps(trunk, norm, pixels[0], (688,), device)  # warm-up
    settings = {"1scale": (688,), "5scale": PAPER_SCALES}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    results: dict[str, object] = {"machine": machine(), "device": str(device), "images": len(images),
                                  "mean_windows_per_image": mean_windows, "backbone": "squeezenet1_0"}
    for name, scales in settings.items():
        start = time.perf_counter()
        for image in pixels:
            conv_maps(trunk, norm, image, scales, device)
        sync()
        results[f"bare_forward_s_per_image_{name}"] = (time.perf_counter() - start) / len(images)

        out = work / f"cache-{name}"
        extract_settings = ExtractSettings(backbone="squeezenet1_0", weights=weights, scales=scales, levels=PAPER_LEVELS)
        summary = run_extract(images, proposals_dir, out, extract_settings, image_set="test", device=device)
        results[f"spp_extract_s_per_image_{name}"] = summary.seconds / len(images)
        results[f"cache_bytes_per_image_{name}"] = summary.bytes_written / len(images)

        cache = FeatureCache(out)
        start, pooled_windows = time.perf_counter(), 0
        for image_id in cache.image_ids:
            cached = cache.load(image_id)
            for _, feats in cached.iter_features(1024, device):
                pooled_windows += len(feats)
        sync()
        pool_s = time.perf_counter() - start
        results[f"pool_s_per_image_{name}"] = pool_s / len(images)
        results[f"pool_s_per_window_{name}"] = pool_s / pooled_windows

    # the largest error the fp16 cache puts into pooled features (5 scales, first images)
    cache = FeatureCache(work / "cache-5scale")
    worst_rel, worst_abs = 0.0, 0.0
    for image, image_id in zip(pixels[:3], cache.image_ids[:3]):
        cached = cache.load(image_id)
        fresh = conv_maps(trunk, norm, image, PAPER_SCALES, device)
        for k, fmap in enumerate(fresh):
            rows = cached.scale_index == k
            exact = spatial_pyramid_pool(fmap, cached.cells[rows].to(device)).cpu()
            diff = (cached.features(torch.nonzero(rows).flatten()) - exact).abs()
            nz = exact >= 2.0**-14  # fp16's normal range; below it the error is absolute (<= 2^-25)
            if nz.any():
                worst_abs = max(worst_abs, float(diff.max()))
                worst_rel = max(worst_rel, float((diff[nz] / exact[nz]).max()))
    results["fp16_cache_max_abs_error"] = worst_abs
    results["fp16_cache_max_rel_error"] = worst_rel

    rng = np.random.default_rng(0)
    start, timed = time.perf_counter(), 0
    for image, im in zip(pixels, images):
        boxes = np.concatenate([im.boxes, proposals[im.image_id]])
        pick = rng.choice(len(boxes), size=min(args.rcnn_windows, len(boxes)), replace=False)
        rcnn_extract(trunk, norm, image, boxes[pick], device)
        timed += len(pick)
    sync()
    rcnn_per_window = (time.perf_counter() - start) / timed
    results["rcnn_style_s_per_window"] = rcnn_per_window
    results["rcnn_style_s_per_image"] = rcnn_per_window * mean_windows
    results["rcnn_style_s_per_image_2000"] = rcnn_per_window * 2000
    results["rcnn_style_note"] = (f"timed on {timed} randomly chosen windows ({args.rcnn_windows} per image) and "
                                  "scaled linearly to the window count")

    rows = [("images", f"{len(images)} VOC07 test, {mean_windows:.0f} windows/image (GT + selective search)"),
            ("device", f"{device} ({results['machine']['processor']}, {torch.get_num_threads()} threads)")]
    for name in settings:
        bare = results[f"bare_forward_s_per_image_{name}"]
        spp = results[f"spp_extract_s_per_image_{name}"]
        pool_w = results[f"pool_s_per_window_{name}"]
        results[f"overhead_vs_bare_forward_{name}"] = spp / bare
        for count, tag in ((2000, ""), (mean_windows, "_at_mean")):
            rcnn = rcnn_per_window * count
            results[f"speedup_vs_rcnn_{name}{tag}"] = rcnn / spp
            results[f"speedup_vs_rcnn_incl_pooling_{name}{tag}"] = rcnn / (spp + pool_w * count)
            results[f"conv_speedup_vs_rcnn_{name}{tag}"] = rcnn / bare
        rows += [
            (f"{name}: bare forward", f"{bare:8.3f} s/image"),
            (f"{name}: SPP extract (cache write incl.)", f"{spp:8.3f} s/image  ({spp / bare:.2f}x bare forward)"),
            (f"{name}: pooling on read", f"{pool_w * 1e6:8.0f} us/window ({pool_w * 2000:.3f} s at 2000 windows)"),
            (f"{name}: cache size", f"{results[f'cache_bytes_per_image_{name}'] / 1e6:8.2f} MB/image"),
            (f"{name}: speedup vs R-CNN @2000: extract", f"{results[f'speedup_vs_rcnn_{name}']:8.1f}x"),
            (f"{name}: speedup vs R-CNN @2000: extract+pool",
             f"{results[f'speedup_vs_rcnn_incl_pooling_{name}']:8.1f}x"),
            (f"{name}: speedup vs R-CNN @2000: conv only", f"{results[f'conv_speedup_vs_rcnn_{name}']:8.1f}x"),
            (f"{name}: speedup vs R-CNN @{mean_windows:.0f}: extract / +pool",
             f"{results[f'speedup_vs_rcnn_{name}_at_mean']:8.1f}x / "
             f"{results[f'speedup_vs_rcnn_incl_pooling_{name}_at_mean']:.1f}x"),
        ]
    rows += [("R-CNN style", f"{rcnn_per_window * 1e3:8.2f} ms/window = {rcnn_per_window * 2000:.1f} s at 2000"),
             ("fp16 cache error (pooled)", f"max abs {worst_abs:.3g}, max rel {worst_rel:.3g}")]
    print_table(rows, "SPP extraction vs bare forward vs R-CNN-style (SqueezeNet)")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
