"""A picture of a search: the query crop, then the top results with their localised boxes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["draw_results", "top_results", "draw_search"]


def draw_results(
    query: np.ndarray,
    results: Sequence[tuple[str, float, np.ndarray | None, np.ndarray | None]],
    out: Path,
    columns: int = 4,
) -> Path:
    """Write a PNG grid: the query (``np.ndarray[H, W, 3]`` uint8 RGB, already cropped)
    and each result ``(name, score, image RGB or None, box or None)``, the box
    ``np.ndarray[4]`` 0-based xyxy pixels drawn in green. Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    panels = len(results) + 1
    rows = -(-panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(query)
    axes.flat[0].set_title("query", fontsize=9, color="tab:blue")
    for rank, ((name, score, image, box), ax) in enumerate(zip(results, axes.flat[1:]), start=1):
        if image is not None:
            ax.imshow(image)
        if box is not None:
            x1, y1, x2, y2 = (float(v) for v in box)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=2))
        ax.set_title(f"{rank}. {name}\n{score:.3f}", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def top_results(index, result, top: int) -> list[tuple[int, str, float, np.ndarray | None]]:
    """The first ``top`` results of a search (:class:`~spp_detect.retrieval.search.SearchResult`)
    as ``(image index, name, score, localised box 0-based xyxy or None)``."""
    return [(int(i), index.names[i], float(score), result.boxes.get(int(i)))
            for i, score in zip(result.order[:top], result.scores[:top])]


def draw_search(index, result, query: np.ndarray, top: int, out: Path) -> Path:
    """:func:`draw_results` of the first ``top`` results, their images read from the index's folder."""
    from spp_detect.image_trunk import load_image_rgb

    panels = []
    for i, name, score, box in top_results(index, result, top):
        path = index.image_path(i)
        panels.append((name, score, load_image_rgb(path) if path is not None else None, box))
    return draw_results(query, panels, out)
