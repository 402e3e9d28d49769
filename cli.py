"""spp-detect command line: the entry point (``spp-detect = "cli:main"``): the click group,
its shared options, and the commands of :data:`COMMAND_MODULES` (``spp_detect/commands/<group>.py``,
each with ``COMMANDS = (...)``; README "How a stage works"). Heavy imports (torch, cv2,
sklearn) happen inside the commands so that ``spp-detect --help`` is instant.
"""

from __future__ import annotations

import logging

import click

from spp_detect import __version__
from spp_detect.commands import classification, detection, evaluation, predict, retrieval, tools
from spp_detect.commands.options import BACKBONE_NAMES, parse_scales

__all__ = ["main", "BACKBONE_NAMES", "parse_scales", "COMMAND_MODULES"]

#: the modules whose ``COMMANDS`` make up the group
COMMAND_MODULES = (detection, evaluation, predict, classification, retrieval, tools)


# --------------------------------------------------------------------------- the group
@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="spp-detect")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """SPP-net object detection, stage by stage.

    \b
    The stages, each reading the previous one's output folder:
      1. proposals   selective search windows per image (or import R-CNN's .mat)
      2. extract     conv maps once per scale, windows assigned to scales, cached
      3. finetune    fc6 -> fc7 -> fc8 on pooled features (no conv layer runs)
      4. train-svm   linear SVMs with hard-negative mining (+ box regression)
      5. detect      score windows, NMS; VOC comp4 files and COCO json
      6. evaluate    VOC07 11-point AP (devkit-exact) / COCO metrics, PR curves
    Your own data (README "Your own dataset"):
      --coco-json FILE --images DIR   a COCO dataset instead of --voc-root
      export-model   a self-contained model folder (weights hash, settings, SVMs)
      predict        detections on images or folders: drawn PNGs + COCO json
    Image classification (paper section 3):
      classify-features, train-classifier   whole-image SPP features, linear SVMs
      train-spp-classifier                  SPP classifier trained end to end
      evaluate --voc2007-cls                devkit classification AP
    Retrieval (R-MAC, AML, query expansion):
      index          descriptors and quantised maps of a folder of images
      search         ranked list for a query image (and box), --show PNG
      evaluate --retrieval paris6k --index DIR    Oxford/Paris mAP
    Tools:
      calibrate      per-class score calibration of a model, for combine
      combine        union of several models' detections, then NMS (paper 4.4)
      show           detections drawn on an image
      info           what a stage folder holds (settings, progress, recall, sizes)
      download-voc2007
    Every stage is resumable: rerun the same command to continue; a folder made
    with other settings is refused (naming them) unless you add --force.
    Run `spp-detect STAGE --help` for its options and an example.
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


for _module in COMMAND_MODULES:
    for _command in _module.COMMANDS:
        main.add_command(_command)


if __name__ == "__main__":
    main()
