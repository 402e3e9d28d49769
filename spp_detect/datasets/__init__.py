"""Dataset readers. Each converts its on-disk box format to 0-based xyxy once, here."""

from spp_detect.datasets.voc import VOC_CLASSES, VOCFormatError, VOCImage, read_voc, voc_year_dir

__all__ = ["VOC_CLASSES", "VOCFormatError", "VOCImage", "read_voc", "voc_year_dir"]
