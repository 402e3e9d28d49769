"""Slow reference for AML: ``spp_detect.retrieval.aml.aml_localize`` as it was before it was
compiled (commit 2791611): torch scoring of the coarse candidates, then a Python loop of
single-box scores for the refinement. The compiled version must find the same boxes."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from spp_detect.retrieval.aml import (
    GRID_STEP, RATIO_TOLERANCE, REFINE_ITERATIONS, REFINE_STEP, AMLResult, coarse_boxes, level_integral,
)
from spp_detect.retrieval.integral import IntegralImage


def _cosines(values: Tensor, query: Tensor) -> Tensor:
    """Cosine of each row of ``Tensor[N, C]`` with ``query`` ``[C]`` (unit norm); 0 for zero rows."""
    norms = values.norm(dim=1)
    dots = values @ query
    return torch.where(norms > 0, dots / norms.clamp_min(1e-30), torch.zeros_like(dots))


def aml_localize_reference(
    levels: Tensor,
    query_mac: np.ndarray | Tensor,
    query_ratio: float,
    *,
    step: int = GRID_STEP,
    ratio_tolerance: float = RATIO_TOLERANCE,
    refine_step: int = REFINE_STEP,
    refine_iterations: int = REFINE_ITERATIONS,
    integral: IntegralImage | None = None,
) -> AMLResult:
    """Localise the query in one database image (``aml.c``: ``max_score`` then ``box_refine``).

    Args:
        levels: ``Tensor[C, H, W]`` uint8 quantised map (:func:`quantize_levels`).
        query_mac: ``[C]`` MAC of the query (normalised here).
        query_ratio: the query's height / width (pixels); boxes of the coarse search keep
            their rows / columns within ``ratio_tolerance`` of it.
        step, ratio_tolerance, refine_step, refine_iterations: the release's ``t``, ``s``,
            ``rf_step``, ``rf_iter``.
        integral: a prebuilt :class:`IntegralImage` of ``levels`` (built here if None).

    Returns:
        :class:`AMLResult`; the whole map when the map is too small for any candidate.
    """
    _, height, width = levels.shape
    integral = integral if integral is not None else level_integral(levels)
    query = torch.as_tensor(np.asarray(query_mac), dtype=torch.float64).flatten()
    query = query / query.norm().clamp_min(1e-300)

    query32 = query.float()

    def score(boxes: Tensor) -> Tensor:
        return _cosines(integral.generalized_max(boxes, torch.float32), query32)

    candidates = coarse_boxes(height, width, query_ratio, step, ratio_tolerance)
    evaluated = len(candidates)
    if len(candidates):
        scores = score(candidates)
        best_index = int(torch.argmax(scores))  # first maximum, as aml.c's strict '>'
        best, best_score = candidates[best_index].tolist(), float(scores[best_index])
    else:
        best = [0, 0, width, height]
        best_score = float(score(torch.tensor([best]))[0])
        evaluated += 1

    for move in range(refine_step, 0, -1):
        for _ in range(refine_iterations):
            changed = False
            # aml.c order: rows (i1 -, i1 +, i2 -, i2 +), then columns (j1 -, j1 +, j2 -, j2 +);
            # a side moves only while the box keeps >= 2 cells and stays inside the map.
            for axis, limit in ((1, height), (0, width)):
                lo, hi = axis, axis + 2
                for side, delta in ((lo, -move), (lo, move), (hi, -move), (hi, move)):
                    trial = list(best)
                    trial[side] += delta
                    if trial[lo] < 0 or trial[hi] > limit or trial[hi] - trial[lo] < 2:
                        continue
                    value = float(score(torch.tensor([trial]))[0])
                    evaluated += 1
                    if value > best_score:
                        best, best_score, changed = trial, value, True
            if not changed:
                break
    return AMLResult(np.array(best, dtype=np.int64), best_score, evaluated)
