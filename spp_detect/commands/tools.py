"""Tools around the stages: show, info, download-voc2007."""

from __future__ import annotations

from pathlib import Path

import click

from spp_detect.commands.options import (
    IN_DIR, IN_FILE, IN_PATH, OUT_FILE, dataset_options, open_dataset_or_usage_error, out_option, stage_errors,
)


@click.command("download-voc2007")
@out_option("Folder to unpack into.")
def download_voc2007_cmd(out: Path) -> None:
    """Download PASCAL VOC2007 (trainval + test, ~900 MB) from the official site."""
    from spp_detect.datasets.download import download_voc2007

    devkit = download_voc2007(out)
    click.echo(f"VOC2007 ready: --voc-root {devkit}")


@click.command("show")
@click.option("--detections", type=IN_PATH, required=True, help="A detect folder, a folder of devkit result files, or a COCO results json.")
@dataset_options(default_image_set="test")
@click.option("--image", "image_ids", multiple=True,
              help="Image id, e.g. 000001 (a COCO image: its file name's stem). Repeat it, or give 'first:N' for the "
              "set's first N images, to get a contact sheet of several  [default with --limit N: the first N].")
@click.option("--columns", type=click.IntRange(min=1), default=3, show_default=True, help="Pictures per row of a contact sheet.")
@out_option("PNG (or JPEG) to write.", OUT_FILE)
@click.option("--threshold", type=float, default=0.0, help="Draw detections scoring above this (SVM margin; 0 is the decision boundary).")
@click.option("--top", type=click.IntRange(min=1), default=20, help="At most this many boxes, best first.")
@click.option("--ground-truth/--no-ground-truth", default=True, help="Also draw the annotated boxes (dashed white).")
def show_cmd(detections, voc_root, year, image_set, coco_json, image_paths, limit, image_ids, columns, out, threshold, top,
             ground_truth) -> None:
    """Draw an image's detections (class and score) and its ground truth into a picture;
    several images make a contact sheet. Green: correct (IoU >= 0.5 with a ground-truth box
    of its class, the devkit's rule), red: wrong, amber: on a difficult object; ground truth
    dashed white.

    \b
    Example:
      spp-detect show --detections runs/dets --voc-root VOCdevkit --image 000001 --out 000001.png
      spp-detect show --detections runs/dets --voc-root VOCdevkit --image first:9 --out sheet.png
      spp-detect show --detections runs/dets --voc-root VOCdevkit --limit 9 --out sheet.png
    """
    from spp_detect.show import show_detections

    if not image_ids and limit is None:
        raise click.UsageError("give --image ID (repeatable, or first:N) or --limit N (the set's first N images)")
    with stage_errors():
        data = open_dataset_or_usage_error(voc_root, image_set, year, coco_json, image_paths, limit)
        if not data.annotated:
            raise click.UsageError("show draws detections with their ground truth: --voc-root, or --coco-json with --images")
        chosen = select_images(data.images, image_ids) if image_ids else list(data.images)
        counts = show_detections(detections, chosen, out, data.name, threshold, top, ground_truth, data.classes, columns,
                                 result_ids=data.result_ids)
    for image, (drawn, _) in zip(chosen, counts):
        click.echo(f"show: {drawn} detection(s) of {image.image_id} above {threshold:g}" + (f" -> {out}" if len(chosen) == 1 else ""))
    if len(chosen) > 1:
        click.echo(f"show: contact sheet of {len(chosen)} images -> {out}")
    click.echo(f"show: {len(chosen)} image{'s' if len(chosen) > 1 else ''}, {sum(d for d, _ in counts)} detections drawn, "
               f"{sum(c for _, c in counts)} correct")


def select_images(images, wanted: tuple[str, ...]) -> list:
    """The images named by ``--image`` values, in order: ids, or ``first:N``."""
    by_id = {im.image_id: im for im in images}
    chosen = []
    for value in wanted:
        if value.startswith("first:") and value[6:].isdigit():
            chosen += list(images)[: int(value[6:])]
        elif value in by_id:
            chosen.append(by_id[value])
        else:
            raise click.BadParameter(f"{value} is not in the image set (an id, or first:N)", param_hint="--image")
    return chosen


@click.command("info")
@click.argument("folder", type=IN_DIR)
@click.option("--voc-root", type=IN_DIR, default=None, envvar="SPP_DETECT_VOC_ROOT",
              help="With a proposals folder: also report recall of the VOC ground truth.")
@click.option("--year", default="2007", show_default=True, help="VOC year (folder VOC<year>).")
@click.option("--image-set", default=None, help="Image list for recall [default: the folder's own].")
@click.option("--coco-json", type=IN_FILE, default=None, help="With a proposals folder: also report recall of this COCO "
              "dataset's ground truth (with --images DIR).")
@click.option("--images", "images_dir", type=IN_DIR, default=None, help="With --coco-json: the folder its file_name "
              "entries are relative to.")
def info_cmd(folder: Path, voc_root: Path | None, year: str, image_set: str | None, coco_json: Path | None,
             images_dir: Path | None) -> None:
    """Summarise a stage folder: its settings, how far it got, and its numbers.

    \b
    proposals: boxes per image; with --voc-root (or --coco-json --images DIR), recall at IoU 0.5 / 0.7 of
               the first 100 ... 2000 boxes, of all objects and of those under 20 px.
    extract:   windows per image, scale shares, feature size, cache MB per image.
    """
    from spp_detect.stage_info import describe_folder

    if coco_json is not None and images_dir is None:
        raise click.UsageError("--coco-json needs --images DIR (the folder its file_name entries are relative to)")
    with stage_errors():
        try:
            lines = describe_folder(folder, voc_root, year, image_set, coco_json, images_dir)
        except FileNotFoundError as exc:  # not a stage folder
            raise click.BadParameter(str(exc), param_hint="FOLDER") from None
    click.echo("\n".join(lines))


#: registered on the group by cli.py, in this order
COMMANDS = (download_voc2007_cmd, show_cmd, info_cmd)
