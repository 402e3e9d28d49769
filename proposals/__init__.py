"""Proposals stage: selective search windows per image, and import/export of R-CNN's files.

Public names:

* :func:`selective_search`, :func:`filter_boxes`, :func:`propose`: one image, pure;
* :func:`load_proposals`, :func:`save_mat`: stage folders and R-CNN ``.mat`` files;
* :func:`run_proposals`, :func:`import_proposals`: the stage driver behind
  ``spp-detect proposals``.

All boxes are ``np.ndarray[N, 4]`` float32, 0-based continuous ``(x1, y1, x2, y2)`` image
pixels (:mod:`spp_detect.boxes`).
"""

from proposals.io import load_mat, load_proposals, save_mat
from proposals.run import BadImageError, ProposalSettings, ProposalsSummary, import_proposals, run_proposals
from proposals.selective_search import MODES, filter_boxes, propose, selective_search

__all__ = [
    "MODES",
    "BadImageError",
    "ProposalSettings",
    "ProposalsSummary",
    "filter_boxes",
    "import_proposals",
    "load_mat",
    "load_proposals",
    "propose",
    "run_proposals",
    "save_mat",
    "selective_search",
]
