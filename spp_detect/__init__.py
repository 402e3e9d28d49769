"""spp-detect: SPP-net object detection (He, Zhang, Ren, Sun; ECCV 2014 / TPAMI 2015).

Modules, by stage:

* :mod:`spp_detect.boxes`: the box convention (0-based continuous xyxy) and box maths;
* :mod:`spp_detect.datasets`: VOC reader (1-based boxes converted once, there);
* :mod:`spp_detect.backbones`: conv trunks with their stride and receptive-field offset;
* :mod:`spp_detect.windows`: image window -> conv cells, and the per-window scale choice;
* :mod:`spp_detect.spp`: spatial pyramid pooling of many windows on one conv map.

This file stays light (no torch import) so that ``spp-detect --help`` is instant.
"""

__version__ = "0.1.0"
