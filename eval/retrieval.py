"""Oxford/Paris retrieval mAP, as the released ``compute_map.m`` (gtolias/rmac helpers;
docs/sources.md 5.1; the same protocol as Philbin et al.'s ``compute_ap``).

For one query, given the ranked database and its ground truth:

* ``ok`` (good + ok) images are the positives, ``junk`` images are ignored: each
  positive's 0-based rank is lowered by the number of junk images ranked before it;
* AP is the trapezoid rule over the positives' ranks (``score_ap_from_ranks1``): positive
  ``j`` (1-based) at 0-based rank ``r`` adds ``(p0 + p1) / 2 / n_ok`` with
  ``p0 = (j - 1) / r`` (1 when ``r = 0``) and ``p1 = j / (r + 1)``; positives not in the
  ranking add nothing.

The Paris6k subset's ground truth (``gnd_paris6k_subset.json``) is read by
:func:`load_paris_ground_truth`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RetrievalQuery", "average_precision", "mean_average_precision", "load_paris_ground_truth"]


@dataclass(frozen=True)
class RetrievalQuery:
    """One query: ``name``, its ``image`` (a database name), ``box`` ``(x1, y1, x2, y2)``
    as in ``_query.txt``, and ``ok`` / ``junk`` database indices."""

    name: str
    image: str
    box: tuple[float, float, float, float]
    ok: np.ndarray
    junk: np.ndarray


def average_precision(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> float:
    """AP of one ranked list.

    Args:
        ranking: ``np.ndarray[N]`` database indices, best first.
        ok: indices of the positives (``len(ok) > 0``).
        junk: indices ignored by the evaluation.

    Returns:
        AP in [0, 1]. E.g. ranking ``[5, 9, 7]`` with ok ``{5, 7}`` and no junk: positives
        at ranks 0 and 2, AP = ((1 + 1) / 2 + (1/2 + 2/3) / 2) / 2 = 0.7917.
    """
    ranking = np.asarray(ranking)
    ok = np.unique(np.asarray(ok))
    if len(ok) == 0:
        raise ValueError("average_precision: the query has no positive")
    pos = np.flatnonzero(np.isin(ranking, ok))  # 0-based ranks, ascending
    junk_ranks = np.flatnonzero(np.isin(ranking, np.asarray(junk)))
    pos = pos - np.searchsorted(junk_ranks, pos)  # minus the junk ranked before each positive
    j = np.arange(1, len(pos) + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_0 = np.where(pos == 0, 1.0, (j - 1) / pos)
    precision_1 = j / (pos + 1)
    return float(np.sum((precision_0 + precision_1) / 2) / len(ok))


def mean_average_precision(rankings: list[np.ndarray], queries: list[RetrievalQuery]) -> tuple[float, np.ndarray]:
    """``(mAP, APs np.ndarray[Q])`` over queries and their rankings (same order)."""
    if len(rankings) != len(queries):
        raise ValueError(f"{len(rankings)} rankings for {len(queries)} queries")
    aps = np.array([average_precision(r, q.ok, q.junk) for r, q in zip(rankings, queries)])
    return float(aps.mean()) if len(aps) else 0.0, aps


def load_paris_ground_truth(path: Path, database: list[str]) -> list[RetrievalQuery]:
    """Queries of a ``gnd_paris6k_subset.json`` file, their indices remapped to ``database``.

    Args:
        path: the JSON (``imlist``, ``qnames``, ``qimlist``, ``gnd[{ok, junk, bbx}]``).
        database: the names of the searched index, in its order.

    Raises:
        ValueError: the index lacks an image the ground truth names.
    """
    data = json.loads(Path(path).read_text())
    imlist = data["imlist"]
    where = {name: i for i, name in enumerate(database)}
    missing = sorted(set(imlist) - set(where))
    if missing:
        raise ValueError(f"the index lacks {len(missing)} image(s) of the ground truth, e.g. {missing[:3]}")
    remap = np.array([where[name] for name in imlist], dtype=np.int64)
    return [
        RetrievalQuery(name, image, tuple(float(v) for v in gnd["bbx"]),
                       remap[np.asarray(gnd["ok"], dtype=np.int64)], remap[np.asarray(gnd["junk"], dtype=np.int64)])
        for name, image, gnd in zip(data["qnames"], data["qimlist"], data["gnd"])
    ]
