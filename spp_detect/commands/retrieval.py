"""Retrieval commands: index, search."""

from __future__ import annotations

from pathlib import Path

import click

from spp_detect.commands.options import (
    IN_DIR, IN_FILE, OUT_FILE, POSITIVE_INT, backbone_options, bar, device_option, force_option, limit_option,
    out_option, parse_bbox, pick_device, settings_from_params, settings_options, stage_errors,
)


def open_index_trunk(index_dir: Path, device: str = "cpu"):
    """The index, its trunk and normalisation (:func:`spp_detect.retrieval.index.load_index_trunk`)."""
    from spp_detect.retrieval.index import load_index_trunk

    try:
        return load_index_trunk(index_dir, pick_device(device))
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="--index") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


INDEX_SETTINGS = "spp_detect.retrieval.index:IndexSettings"


@click.command("index")
@click.argument("images_dir", type=IN_DIR)
@out_option("Index folder.")
@backbone_options(INDEX_SETTINGS)
@click.option("--whiten-images", type=IN_DIR, required=True, envvar="SPP_DETECT_WHITEN_IMAGES", help="Folder of images "
              "of ANOTHER dataset to learn PCA-whitening on (e.g. VOC2007 JPEGImages; env SPP_DETECT_WHITEN_IMAGES).")
@settings_options(INDEX_SETTINGS, whiten_limit=click.IntRange(min=2), levels=POSITIVE_INT)
@limit_option
@device_option
@force_option
def index_cmd(images_dir: Path, out: Path, whiten_images: Path, limit: int | None, device: str, force: bool, **params) -> None:
    """Describe a folder of images for retrieval: MAC, R-MAC region vectors, quantised maps.

    \b
    Example (--whiten-images must not be the searched set; rerun to resume):
      spp-detect index ../shared/data/paris6k-subset/jpg --out runs/paris-index \\
          --whiten-images ../shared/data/voc2007-mini/VOC2007/JPEGImages
    """
    from spp_detect.retrieval.index import IndexSettings, list_images, run_index

    torch_device = pick_device(device)
    with stage_errors():
        summary = run_index(list_images(images_dir, limit), out, settings_from_params(IndexSettings, params),
                            list_images(whiten_images), device=torch_device, force=force, progress=bar())
    click.echo(summary.describe(out))


@click.command("search")
@click.option("--index", "index_dir", type=IN_DIR, required=True, help="Folder made by `spp-detect index`.")
@click.option("--query", type=IN_FILE, required=True, help="Query image.")
@click.option("--bbox", callback=parse_bbox, default=None, help="x1,y1,x2,y2: crop the query to this box first (0-based pixels).")
@click.option("--method", type=click.Choice(["rmac", "mac"]), default="rmac", help="First-search descriptor.")
@click.option("--whiten/--no-whiten", default=True, help="Use the index's PCA-whitening.")
@click.option("--rerank", type=click.IntRange(min=0), default=100, help="AML re-ranks the top N (0: off).")
@click.option("--qe", type=click.IntRange(min=0), default=0, help="Average query expansion with the top N (paper: 5).")
@click.option("--top", type=click.IntRange(min=1), default=10, help="Results to print (and draw).")
@click.option("--show", type=OUT_FILE, default=None, help="Write a PNG: the query and the top results with their localised boxes.")
@device_option
def search_cmd(index_dir: Path, query: Path, bbox: tuple[float, ...] | None, method: str, whiten: bool, rerank: int, qe: int,
               top: int, show: Path | None, device: str) -> None:
    """Find the images of an index that show the query object.

    \b
    R-MAC (or MAC) ranks the whole index; AML localises the query in the top --rerank
    images and re-scores them; --qe averages the query with its best results. Example:
      spp-detect search --index runs/paris-index --query paris_louvre_000136.jpg \\
          --bbox 14,76,989,564 --qe 5 --show louvre.png
    """
    from spp_detect.image_trunk import load_image_rgb
    from spp_detect.retrieval.descriptors import crop_query
    from spp_detect.retrieval.draw import draw_search, top_results
    from spp_detect.retrieval.search import describe_query, search

    if qe and not rerank:
        raise click.UsageError("--qe uses the localised results: give --rerank > 0 too")
    index, trunk, norm = open_index_trunk(index_dir, device)
    with stage_errors():
        image = load_image_rgb(query)
        described = describe_query(trunk, norm, image, bbox, int(index.config["levels"]))
    result = search(index, described, method=method, whiten=whiten, rerank=min(rerank, len(index)), qe=qe)
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items())
    click.echo(f"{len(index)} images searched ({method}{', whitened' if whiten else ''}"
               f"{f', AML top {rerank}' if rerank else ''}{f', QE {qe}' if qe else ''}): {steps}")
    click.echo(f"{'rank':>4}  {'score':>7}  {'image':<32} box (x1,y1,x2,y2)")
    for rank, (_, name, score, box) in enumerate(top_results(index, result, top), start=1):
        click.echo(f"{rank:>4}  {score:>7.4f}  {name:<32} {','.join(f'{v:.0f}' for v in box) if box is not None else '-'}")
    if show is not None:
        click.echo(f"wrote {draw_search(index, result, crop_query(image, bbox) if bbox is not None else image, top, show)}")

#: registered on the group by cli.py, in this order
COMMANDS = (index_cmd, search_cmd)
