"""Which share of a job this process does, as its launcher says (torchrun or SLURM).

A stage run by ``torchrun --nproc-per-node G`` or by ``srun --ntasks N`` is N copies of
the same command. Each copy reads its place in the job from the environment:

* torchrun (``torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and
  ``MASTER_ADDR``/``MASTER_PORT`` for the process group); these win when present, so
  torchrun inside a SLURM job works as torchrun;
* SLURM's ``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS`` (``SLURM_STEP_NUM_TASKS`` for
  the step, preferred when set) and ``SLURM_LOCALID``;
* otherwise the process is alone: rank 0 of 1.

Per-image stages (``proposals``, ``extract``, ``detect``) turn that into a shard
``(k, n)``: process ``k`` (1-based) takes images ``k-1, k-1+n, ...`` of the image list,
and no process group is needed. ``finetune`` forms a process group
(:func:`init_process_group`) for DistributedDataParallel. The device of a process is
``cuda:<local rank>`` for ``--device cuda``, and for ``--device auto`` when CUDA is present
(:func:`spp_detect.device.resolve_device`).

The released SPP-net split such jobs by hand into index chunks run in separate MATLAB
sessions; this module is that split, made automatic.
"""

from __future__ import annotations

import contextlib

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Launch", "launch_from_env", "parse_shard", "resolve_shard", "init_process_group", "process_group", "cpus_per_process"]


@dataclass(frozen=True)
class Launch:
    """This process's place in a launched job.

    Attributes:
        rank: 0-based index among all processes of the job.
        world_size: number of processes in the job.
        local_rank: 0-based index among the processes on this machine (picks the GPU).
        launcher: ``"torchrun"``, ``"slurm"`` or ``"none"``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"

    @property
    def shard(self) -> tuple[int, int]:
        """``(k, n)``, 1-based ``k = rank + 1``, ``n = world_size``."""
        return self.rank + 1, self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def launch_from_env(env: Mapping[str, str] | None = None) -> Launch:
    """Read torchrun's, else SLURM's variables from ``env`` (default ``os.environ``).

    Raises:
        ValueError: a variable that is not an integer, or a rank outside ``[0, world)``.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launch = Launch(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0, "torchrun")
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        world = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launch = Launch(_int(env, "SLURM_PROCID"), world, local, "slurm")
    else:
        return Launch()
    if not (launch.world_size >= 1 and 0 <= launch.rank < launch.world_size and launch.local_rank >= 0):
        raise ValueError(f"{launch.launcher} environment gives rank {launch.rank} of {launch.world_size} processes")
    return launch


def parse_shard(value: str) -> tuple[int, int] | None:
    """``"K/N"`` -> ``(K, N)`` (1-based ``K``); ``"auto"`` -> None.

    Raises:
        ValueError: neither ``auto`` nor ``K/N`` with ``1 <= K <= N``.
    """
    if value.strip().lower() == "auto":
        return None
    try:
        k, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise ValueError(f"expected 'auto' or K/N such as 1/4, got {value!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= K <= N, got {value!r}")
    return k, n


def resolve_shard(value: str, launch: Launch) -> tuple[int, int]:
    """The shard of this process: ``K/N`` as given, or ``auto`` = the launcher's (1/1 alone)."""
    shard = parse_shard(value)
    return launch.shard if shard is None else shard


def init_process_group(launch: Launch, device) -> bool:
    """Join the job's process group when it has more than one process: nccl on CUDA,
    gloo on CPU, rendezvous through ``MASTER_ADDR``/``MASTER_PORT`` (torchrun sets them;
    under plain ``srun`` export them, see docs/scaling.md). Returns whether it did.

    Raises:
        ValueError: several processes but no ``MASTER_ADDR``/``MASTER_PORT``.
    """
    if launch.world_size <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(
            f"{launch.world_size} {launch.launcher} processes need a rendezvous, but {', '.join(missing)} "
            "is not set: launch with torchrun, or export MASTER_ADDR (first node) and MASTER_PORT (docs/scaling.md)"
        )
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size)
    return True


@contextlib.contextmanager
def process_group(launch: Launch, device):
    """Inside: this process has joined the job's process group (:func:`init_process_group`,
    when there is more than one process); on the way out it leaves it."""
    joined = init_process_group(launch, device)
    try:
        yield
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def cpus_per_process() -> int:
    """This machine's CPUs (those this process may use) shared among the job's processes
    on it (``LOCAL_WORLD_SIZE``, set by torchrun): the default worker count of a stage that
    runs worker processes, so that a launched job does not oversubscribe its machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
