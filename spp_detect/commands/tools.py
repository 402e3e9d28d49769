"""Tools around the stages: show, info, download-voc2007."""

from __future__ import annotations

from pathlib import Path

import click

from spp_detect.commands.options import (
    read_voc_or_usage_error,
    voc_options,
)


@click.command("download-voc2007")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder to unpack into.")
def download_voc2007_cmd(out: Path) -> None:
    """Download PASCAL VOC2007 (trainval + test, ~900 MB) from the official site."""
    from spp_detect.datasets.download import download_voc2007

    devkit = download_voc2007(out)
    click.echo(f"VOC2007 ready: --voc-root {devkit}")


@click.command("show")
@click.option("--detections", type=click.Path(exists=True, path_type=Path), required=True,
              help="A detect folder, a folder of devkit result files, or a COCO results json.")
@voc_options(default_image_set="test")
@click.option("--image", "image_id", required=True, help="Image id, e.g. 000001.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG (or JPEG) to write.")
@click.option("--threshold", type=float, default=0.0, help="Draw detections scoring above this (SVM margin; 0 is the decision boundary).")
@click.option("--top", type=click.IntRange(min=1), default=20, help="At most this many boxes, best first.")
@click.option("--ground-truth/--no-ground-truth", default=True, help="Also draw the annotated boxes (dashed white).")
def show_cmd(detections, voc_root, year, image_set, image_id, out, threshold, top, ground_truth) -> None:
    """Draw one image's detections (class and score) and its ground truth into a picture.

    \b
    Example:
      spp-detect show --detections runs/dets --voc-root VOCdevkit --image 000001 --out 000001.png
    """
    import cv2
    import numpy as np

    from eval.results import DetectionsError, read_detections
    from spp_detect.datasets.voc import VOCFormatError, read_voc
    from spp_detect.image_trunk import load_image_rgb
    from spp_detect.images import ImageReadError
    from spp_detect.show import draw_boxes

    try:
        images = {im.image_id: im for im in read_voc(voc_root, image_set, year)}
        if image_id not in images:
            raise click.BadParameter(f"{image_id} is not in the {image_set} image set", param_hint="--image")
        image = images[image_id]
        dets = read_detections(detections, image_set)
        pixels = load_image_rgb(image.path)
    except (VOCFormatError, DetectionsError, ImageReadError) as exc:
        raise click.ClickException(str(exc)) from None
    from spp_detect.datasets.voc import VOC_CLASSES

    rows = []
    for c, name in enumerate(VOC_CLASSES):
        d = dets.get(name)
        if d is None:
            continue
        mine = (d.image_ids == image_id) & (d.scores > threshold)
        rows += [(float(s), c, name, b) for s, b in zip(d.scores[mine], d.boxes[mine])]
    rows = sorted(rows, key=lambda r: -r[0])[:top]
    canvas = draw_boxes(
        pixels,
        np.array([r[3] for r in rows]).reshape(-1, 4),
        [f"{r[2]} {r[0]:.2f}" for r in rows],
        [r[1] for r in rows],
        ground_truth=image.boxes if ground_truth else None,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), canvas[:, :, ::-1]):
        raise click.ClickException(f"cannot write {out} (is the extension .png or .jpg?)")
    click.echo(f"show: {len(rows)} detection(s) of {image_id} above {threshold:g} -> {out}")


@click.command("info")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--voc-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    envvar="SPP_DETECT_VOC_ROOT",
    help="With a proposals folder: also report recall of the VOC ground truth.",
)
@click.option("--year", default="2007", show_default=True, help="VOC year (folder VOC<year>).")
@click.option("--image-set", default=None, help="Image list for recall [default: the folder's own].")
def info_cmd(folder: Path, voc_root: Path | None, year: str, image_set: str | None) -> None:
    """Summarise a stage folder: its settings, how far it got, and its numbers.

    \b
    proposals: boxes per image; with --voc-root, recall of non-difficult ground
               truth at IoU 0.5 / 0.7 for the first 100 ... 2000 boxes.
    extract:   windows per image, scale shares, feature size, cache MB per image.
    """
    import json

    from spp_detect.stage_dir import read_manifest

    try:
        manifest = read_manifest(folder)
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="FOLDER") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    stage, config = manifest.get("stage"), manifest.get("config", {})
    click.echo(f"{folder}: {stage} stage, key {manifest.get('key', '')[:12]}")
    click.echo("  settings: " + json.dumps(config, sort_keys=True))
    if stage == "proposals":
        import numpy as np

        from proposals.io import load_proposals
        from proposals.recall import proposal_recall

        damaged: list = []
        proposals = load_proposals(folder, bad=damaged)
        counts = [len(b) for b in proposals.values()]
        click.echo(f"  images: {len(proposals)}, boxes/image: {np.mean(counts) if counts else 0:.1f}")
        for error in damaged:
            click.echo(f"  unusable: {error}")
        if voc_root is not None:
            name = image_set or config.get("dataset", {}).get("image_set", "test")
            images = [im for im in read_voc_or_usage_error(voc_root, name, year) if im.image_id in proposals]
            table = proposal_recall(images, proposals)
            click.echo(f"  recall of {table['num_objects']} non-difficult objects in {len(images)} images:")
            for threshold, by_k in table["recall"].items():
                cells = "  ".join(f"top {k}: {r:.3f}" for k, r in by_k.items())
                click.echo(f"    {threshold}  {cells}")
    elif stage == "extract":
        from spp_detect.cache import FeatureCache

        stats = FeatureCache(folder).summary()
        shares = ", ".join(f"{s}: {100 * p:.0f}%" for s, p in zip(config["scales"], stats["scale_share"]))
        click.echo(
            f"  images: {stats['images']}, windows/image: {stats['windows_per_image']:.0f}, "
            f"cache: {stats['bytes_per_image'] / 1e6:.2f} MB/image"
        )
        click.echo(f"  feature: {stats['feature_dim']} numbers per window (levels {config['levels']})")
        click.echo(f"  windows per scale: {shares}")
        for line in stats["damaged"]:
            click.echo(f"  damaged (rerun extract to redo it): {line}")


#: registered on the group by cli.py, in this order
COMMANDS = (download_voc2007_cmd, show_cmd, info_cmd)
