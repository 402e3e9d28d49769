"""Resolve ``--device`` values to a ``torch.device``."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` (modulo the visible GPUs) when CUDA is available,
    else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given. ``local_rank``: this process's
    place on its machine in a torchrun / srun job (:mod:`spp_detect.distributed`).

    Raises:
        ValueError: an unknown name, or CUDA asked for where there is none.
    """
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device
