"""spp-detect: SPP-net object detection (He, Zhang, Ren, Sun; ECCV 2014 / TPAMI 2015).

Modules, by stage:

* :mod:`spp_detect.boxes`: the box convention (0-based continuous xyxy) and box maths;
* :mod:`spp_detect.datasets`: VOC, COCO and plain-image readers (boxes converted once, there), one registry;
* :mod:`spp_detect.backbones`: conv trunks with their stride and receptive-field offset;
* :mod:`spp_detect.windows`: image window -> conv cells, and the per-window scale choice;
* :mod:`spp_detect.spp`: spatial pyramid pooling of many windows on one conv map;
* :mod:`spp_detect.model`: a trained detector as one folder; ``load_model(folder).predict(image)``.

This file stays light (no torch import) so that ``spp-detect --help`` is instant.
"""

import os

__version__ = "0.1.0"

# Huge pages for torch's large CPU tensors (PyTorch's CPU allocator reads this once, before
# its first allocation: docs/sources.md 9.1). Each minibatch of fine-tuning allocates fc6's
# 105 MB weight gradient afresh; with 4 KB pages, faulting it in costs ~20 ms of the ~90 ms
# backward pass on this project's 2-core CPU. Set before torch is imported; a user's own
# setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    # load_model imports torch: only when asked for
    if name == "load_model":
        from spp_detect.model import load_model

        return load_model
    raise AttributeError(f"module 'spp_detect' has no attribute {name!r}")
