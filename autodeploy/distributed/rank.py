"""Which tensor-parallel rank this process is, and the process group it runs its collectives on."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from autodeploy.errors import AutoDeployError, ConfigError

log = logging.getLogger(__name__)

# Collective timeout (seconds): a peer that stops answering fails a step with an error instead of hanging it.
DEFAULT_TIMEOUT_S = float(os.environ.get("AUTODEPLOY_TP_TIMEOUT", "120"))


class DistributedError(AutoDeployError):
    """A tensor-parallel group failed (a collective timed out, a rank could not start)."""


class WorkerDiedError(DistributedError):
    """A tensor-parallel worker process exited; the error names its rank and exit code."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the group. ``launched``: how the ranks started (``spawn`` by the library, or
    ``torchrun``); ``group_name`` is what the graph's functional collectives name the group by."""

    rank: int
    world_size: int
    backend: str
    group_name: str
    launched: str = "spawn"


_CURRENT: Optional[RankInfo] = None


def current() -> Optional[RankInfo]:
    """The rank this process is compiling/serving as, or None outside a tensor-parallel group."""
    return _CURRENT


def set_current(info: Optional[RankInfo]) -> None:
    global _CURRENT
    _CURRENT = info


def backend_for(device: Optional[torch.device]) -> str:
    """NCCL on CUDA devices, gloo on CPU."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def init_group(rank: int, world_size: int, backend: str, init_method: str,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """``init_process_group`` with a collective timeout; returns the group's name."""
    if dist.is_initialized():
        raise ConfigError("a torch.distributed process group already exists in this process; one tensor-parallel "
                          "model per process at a time (shut the other one down first)")
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:
        raise DistributedError(f"rank {rank}: init_process_group({backend!r}) failed: {exc}") from exc
    return dist.group.WORLD.group_name


def torchrun_env() -> Optional[tuple[int, int]]:
    """(rank, world size) when launched by torchrun (its RANK / WORLD_SIZE variables), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def resolve(tensor_parallel_size: int, device: Optional[torch.device]) -> Optional[RankInfo]:
    """The rank a ``compile(..., tensor_parallel_size=N)`` call runs as: the spawned worker's, torchrun's (the
    group is initialised here from its environment), or None for the caller that must start the ranks."""
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ConfigError(f"tensor_parallel_size must be a positive int, got {tensor_parallel_size!r}")
    info = current()
    if info is None and tensor_parallel_size == 1:
        return None
    if info is not None:
        if info.world_size != tensor_parallel_size:
            raise ConfigError(f"this process is rank {info.rank} of {info.world_size}, but "
                              f"tensor_parallel_size={tensor_parallel_size} was asked for")
        return info
    env = torchrun_env()
    if env is None:
        return None
    rank, world = env
    if world != tensor_parallel_size:
        raise ConfigError(f"launched by torchrun with WORLD_SIZE={world}, but tensor_parallel_size="
                          f"{tensor_parallel_size}; they must match")
    backend = backend_for(device)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise ConfigError(f"the existing process group has {dist.get_world_size()} ranks, not {world}")
        name = dist.group.WORLD.group_name
    else:
        name = init_group(rank, world, backend, "env://")
    info = RankInfo(rank, world, backend, name, launched="torchrun")
    set_current(info)
    return info
