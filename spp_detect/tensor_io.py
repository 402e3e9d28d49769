"""Tensors on disk as plain ``.npz`` archives (no pickles), written atomically.

Model heads, SVM weights, box regressors and training checkpoints are dicts of named
tensors; they are stored with :func:`numpy.savez` and read back with
``allow_pickle=False``, so a file can never run code when it is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spp_detect.stage_dir import write_npz

__all__ = ["save_tensors", "load_tensors"]


def save_tensors(path: Path | str, tensors: Mapping[str, Tensor | np.ndarray]) -> Path:
    """Write ``{name: tensor}`` to ``path`` (``.npz``) atomically and byte-reproducibly;
    returns ``path``."""
    arrays = {name: (t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)) for name, t in tensors.items()}
    write_npz(Path(path), arrays)  # atomic, and the same bytes for the same tensors
    return Path(path)


def load_tensors(path: Path | str) -> dict[str, Tensor]:
    """Read a file written by :func:`save_tensors` into CPU tensors.

    Raises:
        FileNotFoundError: no such file. ValueError: not a readable ``.npz`` archive.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: torch.from_numpy(np.array(data[name])) for name in data.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable tensor archive ({exc})") from None
