"""What ``spp-detect info`` reports about a stage folder: its stage, settings and key, how
far it got, and its numbers (proposals: boxes per image and, given the annotations, recall;
extract: windows per image, scale shares, feature size, cache size, damaged files)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["describe_folder"]


def describe_folder(folder: Path, voc_root: Path | None = None, year: str = "2007", image_set: str | None = None,
                    coco_json: Path | None = None, images_dir: Path | None = None) -> list[str]:
    """Lines describing the stage folder ``folder``; with ``voc_root`` (or ``coco_json`` and
    its ``images_dir``), a proposals folder's recall of that ground truth: VOC's image set
    ``image_set`` (default: the folder's own) or the json's images.

    Raises:
        FileNotFoundError: not a stage folder; ValueError: a damaged manifest.
    """
    from spp_detect.stage_dir import read_manifest

    manifest = read_manifest(folder)
    stage, config = manifest.get("stage"), manifest.get("config", {})
    lines = [f"{folder}: {stage} stage, key {manifest.get('key', '')[:12]}", "  settings: " + json.dumps(config, sort_keys=True)]
    if stage == "proposals":
        from spp_detect.datasets.registry import open_dataset

        annotated = None
        if coco_json is not None:
            annotated = open_dataset(coco_json=coco_json, images=[images_dir] if images_dir is not None else []).images
        elif voc_root is not None:
            name = image_set or config.get("dataset", {}).get("image_set", "test")
            annotated = open_dataset(voc_root=voc_root, image_set=name, year=year).images
        lines += _proposals(folder, annotated)
    elif stage == "extract":
        lines += _extract(folder, config)
    return lines


def _proposals(folder: Path, annotated: Sequence | None) -> list[str]:
    import numpy as np

    from proposals.io import load_proposals
    from proposals.recall import proposal_recall

    damaged: list = []
    proposals = load_proposals(folder, bad=damaged)
    counts = [len(b) for b in proposals.values()]
    lines = [f"  images: {len(proposals)}, boxes/image: {np.mean(counts) if counts else 0:.1f}"]
    lines += [f"  unusable: {error}" for error in damaged]
    if annotated is not None:
        images = [im for im in annotated if im.image_id in proposals]
        table = proposal_recall(images, proposals)
        lines.append(f"  recall of {table['num_objects']} non-difficult objects in {len(images)} images:")
        for threshold, by_k in table["recall"].items():
            lines.append(f"    {threshold}  " + "  ".join(f"top {k}: {r:.3f}" for k, r in by_k.items()))
        small = table["small"]
        lines.append(f"  recall of the {small['num_objects']} of them under {small['size']:g} px wide or tall"
                     + (":" if small["num_objects"] else " (none)"))
        if small["num_objects"]:
            for threshold, by_k in small["recall"].items():
                lines.append(f"    {threshold}  " + "  ".join(f"top {k}: {r:.3f}" for k, r in by_k.items()))
    return lines


def _extract(folder: Path, config: dict) -> list[str]:
    from spp_detect.cache import FeatureCache

    stats = FeatureCache(folder).summary()
    shares = ", ".join(f"{s}: {100 * p:.0f}%" for s, p in zip(config["scales"], stats["scale_share"]))
    return [f"  images: {stats['images']}, windows/image: {stats['windows_per_image']:.0f}, "
            f"cache: {stats['bytes_per_image'] / 1e6:.2f} MB/image",
            f"  feature: {stats['feature_dim']} numbers per window (levels {config['levels']})",
            f"  windows per scale: {shares}",
            *(f"  damaged (rerun extract to redo it): {line}" for line in stats["damaged"])]
