"""The one device rule: ``--device`` values and ``device=`` arguments to canonical ``torch.device`` objects.

A canonical device carries its index where the index means something: ``cpu`` for the
CPU (``cpu:0``, ``cpu:1`` are the same memory and torch reports tensors there as ``cpu``),
``cuda:N`` for a GPU (tensors made on a bare ``cuda`` report ``cuda:<current device>``).
Two spellings of one device compare equal only in canonical form: ``torch.device("cpu:0")
!= torch.device("cpu")`` and ``torch.device("cuda") != torch.device("cuda:0")``, which is
why code compares devices with :func:`same_device`, never with ``==``.

* :func:`canonical_device` is the pure spelling rule (no environment, no CUDA query);
* :func:`resolve_device` is the rule of the command line: ``auto``, and ``cuda`` meaning this
  process's GPU under torchrun / srun (its local rank, :mod:`spp_detect.distributed`),
  checked against the GPUs present.
"""

from __future__ import annotations

import torch

__all__ = ["canonical_device", "resolve_device", "same_device"]

_KINDS = ("cpu", "cuda")


def canonical_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """``device`` in canonical form: ``cpu`` for any CPU spelling, ``cuda:N`` for a GPU.

    Args:
        device: ``"cpu"``, ``"cpu:N"``, ``"cuda"``, ``"cuda:N"`` or such a ``torch.device``.
        local_rank: the index a bare ``cuda`` gets (0: torch's default GPU).

    Example: ``canonical_device("cpu:0") == torch.device("cpu")``;
    ``canonical_device("cuda", 1) == torch.device("cuda", 1)``.

    Raises:
        ValueError: not a device name, or a device other than CPU or CUDA.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in _KINDS:
        raise ValueError(f"unsupported device {str(device)!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", device.index if device.index is not None else int(local_rank))


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """Whether ``a`` and ``b`` name the same device, compared in canonical form
    (:func:`canonical_device`): ``cpu`` == ``cpu:0``, ``cuda`` == ``cuda:0``, ``cuda:0`` != ``cuda:1``."""
    return canonical_device(a) == canonical_device(b)


def resolve_device(name: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """A ``--device`` value as a canonical device of this machine.

    ``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``"cuda"`` ->
    ``cuda:<local_rank>``; ``"cuda:N"`` as given; any CPU spelling -> ``cpu``. The local
    rank is taken modulo the visible GPUs (a launcher that gives each process one GPU
    through ``CUDA_VISIBLE_DEVICES`` makes it ``cuda:0`` in every process).

    Args:
        local_rank: this process's place on its machine in a torchrun / srun job; None: read
            from the launcher's environment (``LOCAL_RANK``, else ``SLURM_LOCALID``; 0 alone,
            :func:`spp_detect.distributed.launch_from_env`).

    Raises:
        ValueError: an unknown name, CUDA asked for where there is none, or a GPU index
            beyond those visible.
    """
    if isinstance(name, str) and name.strip().lower() == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = canonical_device(name)  # validates before the environment is read
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} asked for, but CUDA is not available here; use --device cpu")
    count = torch.cuda.device_count()
    if torch.device(name).index is None:
        if local_rank is None:
            from spp_detect.distributed import launch_from_env

            local_rank = launch_from_env().local_rank
        return torch.device("cuda", int(local_rank) % count)
    if device.index >= count:
        raise ValueError(f"device {str(name)!r} asked for, but only {count} GPU(s) are visible here (cuda:0..cuda:{count - 1})")
    return device
