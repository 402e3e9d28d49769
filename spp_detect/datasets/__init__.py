"""Dataset readers. Each converts its on-disk box format to 0-based xyxy once, here.

:mod:`spp_detect.datasets.registry` puts them behind one interface
(:func:`~spp_detect.datasets.registry.open_dataset`): a VOC devkit, a COCO json with its
image folder, or plain images without annotations, each with its class list.
"""

from spp_detect.datasets.coco import COCOFormatError, COCOImage, read_coco
from spp_detect.datasets.registry import DATASETS, Dataset, DatasetError, open_dataset
from spp_detect.datasets.result_ids import ResultIds
from spp_detect.datasets.voc import VOC_CLASSES, VOCFormatError, VOCImage, read_voc, voc_year_dir

__all__ = [
    "VOC_CLASSES", "VOCFormatError", "VOCImage", "read_voc", "voc_year_dir",
    "COCOFormatError", "COCOImage", "read_coco",
    "DATASETS", "Dataset", "DatasetError", "open_dataset", "ResultIds",
]
