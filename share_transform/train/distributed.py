"""Process-group set-up for ``torchrun`` (one process per device), and rank-0-only output.

``torchrun --nproc_per_node=G [--nnodes=N --rdzv-endpoint=HOST:PORT] recipe.py ...`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``python recipe.py`` is world size 1 and needs no process group.
NCCL joins CUDA devices, gloo CPU processes (the CI path). Only rank 0 prints or writes files.

Example:
    >>> dist_info = init_distributed("cpu")
    >>> print0(f"rank {dist_info.rank} of {dist_info.world_size}")
    >>> cleanup()
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global rank, the world size, its rank on the node and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as torchrun sets them; ``(0, 1, 0)`` outside torchrun."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def init_distributed(device: str, *, timeout_s: float = 1800.0) -> DistInfo:
    """Pick this process's device and, under torchrun, join the process group.

    Args:
        device: ``"cuda"`` (each process takes ``cuda:LOCAL_RANK``; backend NCCL) or ``"cpu"`` (gloo).
        timeout_s: how long a collective may wait for a slow rank before failing.

    Raises:
        ConfigError: CUDA asked for but absent, or fewer GPUs on the node than processes.
    """
    rank, world_size, local_rank = world_from_env()
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is visible; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU: this node shows {torch.cuda.device_count()} CUDA device(s); "
                "lower --nproc_per_node"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ConfigError(f"unknown --device {device!r}; choose cuda or cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_main_process() -> bool:
    """True on rank 0 (and outside torchrun), also before the process group is joined."""
    return dist.get_rank() == 0 if dist.is_initialized() else world_from_env()[0] == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only, flushed so logs interleave in order."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def print_error(message: str) -> None:
    """The one-line error report on stderr: ``error: message``, or ``error: (rank R) message`` under torchrun.

    Every failing rank reports: an error may be one rank's own (data missing on one node), and torchrun
    stops the other ranks as soon as one exits, so rank 0 may never get to say it.
    """
    rank, world_size, _ = world_from_env()
    where = f"(rank {rank}) " if world_size > 1 else ""
    print(f"error: {where}{message}", file=sys.stderr, flush=True)


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if dist.is_initialized():
        dist.barrier()


def share_verdict(message: str | None) -> str | None:
    """Rank 0's ``message`` on every rank (the others pass None); ``message`` itself outside a process group."""
    if not dist.is_initialized():
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it (identity outside a process group)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank, so every rank takes the same branch."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each forward, so after the last training step each rank holds its own
    update; evaluating and checkpointing need one agreed model.
    """
    if dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, src=0)


def cleanup() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()
