"""spp-detect command line: one subcommand per pipeline stage.

Only this module knows about the command line. Each command parses its options, calls
one library function and prints a short summary. Heavy imports (torch, cv2, sklearn)
happen inside the commands so that ``spp-detect --help`` is instant.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from spp_detect import __version__

# Backbone names, kept here so --help does not import torch; tests check they match
# spp_detect.backbones.BACKBONES.
BACKBONE_NAMES = ("alexnet", "mobilenet_v2", "resnet50", "squeezenet1_0", "vgg16", "zf5")


# --------------------------------------------------------------------------- shared options
def voc_options(default_image_set: str | None = None):
    """``--voc-root``, ``--year``, ``--image-set``: which VOC images a stage reads."""

    def decorate(f):
        f = click.option(
            "--image-set",
            default=default_image_set,
            required=default_image_set is None,
            show_default=True,
            help="Image list under ImageSets/Main (train, val, trainval, test).",
        )(f)
        f = click.option("--year", default="2007", show_default=True, help="VOC year (folder VOC<year>).")(f)
        f = click.option(
            "--voc-root",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            required=True,
            envvar="SPP_DETECT_VOC_ROOT",
            help="VOCdevkit folder holding VOC<year>/ (env SPP_DETECT_VOC_ROOT).",
        )(f)
        return f

    return decorate


force_option = click.option(
    "--force", is_flag=True, help="Recompute everything, even if a cache with other settings exists."
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
)
workers_option = click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Worker processes [default: CPU count]."
)


def backbone_options(f):
    """``--backbone``, ``--weights``, ``--input-norm``: the conv trunk and its weights."""
    f = click.option(
        "--input-norm",
        type=click.Choice(["auto", "torchvision", "caffe-bgr", "tf-rgb"]),
        default="auto",
        show_default=True,
        help="Input normalisation the weights expect. auto: torchvision's for --weights "
        "imagenet/none, the known convention for the files in shared/data/weights, "
        "else torchvision's.",
    )(f)
    f = click.option(
        "--weights",
        default="imagenet",
        show_default=True,
        help="'imagenet' (torchvision weights, downloaded), 'none' (random init) or a state_dict file.",
    )(f)
    f = click.option(
        "--backbone",
        type=click.Choice(BACKBONE_NAMES),
        default="squeezenet1_0",
        show_default=True,
        help="Conv trunk whose last map is pooled.",
    )(f)
    return f


def parse_scales(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """Callback for comma-separated scale lists like ``480,576,688,864,1200``."""
    try:
        scales = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise click.BadParameter(f"expected positive scales, got {value!r}")
    if len(set(scales)) != len(scales):
        raise click.BadParameter(f"scales repeat: {value!r}")
    return scales


# --------------------------------------------------------------------------- the group
@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="spp-detect")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """SPP-net object detection, stage by stage.

    \b
    The stages, each reading the previous one's output:
      1. proposals   selective search windows per image
      2. extract     conv maps once per scale, spatial pyramid pooling per window
      3. evaluate    VOC07 11-point AP / COCO metrics of a detections file
    Every stage is resumable: rerun the same command to continue, add --force to
    recompute with changed settings. Run `spp-detect STAGE --help` for its options.
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command("download-voc2007")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder to unpack into.")
def download_voc2007_cmd(out: Path) -> None:
    """Download PASCAL VOC2007 (trainval + test, ~900 MB) from the official site."""
    from spp_detect.datasets.download import download_voc2007

    devkit = download_voc2007(out)
    click.echo(f"VOC2007 ready: --voc-root {devkit}")


if __name__ == "__main__":
    main()
