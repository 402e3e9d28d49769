"""Precision-recall curves as one PNG (matplotlib's Agg canvas; no pyplot, no display)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from spp_detect.stage_dir import atomic_write

__all__ = ["plot_pr_curves"]


def plot_pr_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: Path | str,
    title: str | None = None,
    columns: int = 5,
) -> Path:
    """Draw one precision-recall subplot per class into a PNG file (written atomically).

    Args:
        curves: class name -> ``(recall [D], precision [D], AP)``, recall and precision in
            rank order (e.g. :class:`eval.voc.ClassAP` fields). Empty arrays give an empty
            subplot; a NaN AP prints as "n/a".
        path: the PNG file to write (folders are created).
        title: figure title, e.g. ``"VOC2007 test, mAP 0.612"``.
        columns: subplots per row (20 classes -> 4 rows of 5).

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(curves)
    columns = max(1, min(columns, len(names) or 1))
    rows = max(1, math.ceil(len(names) / columns))
    fig = Figure(figsize=(3.0 * columns, 2.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_axis_off()
    for ax, name in zip(axes.flat, names):
        rec, prec, ap = curves[name]
        rec = np.asarray(rec, dtype=np.float64)
        prec = np.asarray(prec, dtype=np.float64)
        if rec.size:
            ax.plot(rec, prec, "-", linewidth=1.2)
        ap_text = "n/a" if ap is None or np.isnan(ap) else f"{ap:.3f}"
        ax.set_title(f"{name}  AP {ap_text}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(True, linewidth=0.4)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    return path
