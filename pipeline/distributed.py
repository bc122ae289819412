"""Running under torchrun: this process's rank, the process group (NCCL on GPUs, gloo on CPUs)
and the few collectives fine-tuning and extraction need. A plain run is rank 0 of 1: nothing
here touches torch.distributed then, and every collective is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among those torchrun started."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # index among the processes on this node: its GPU

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the outputs and shows progress; the others only compute."""
        return self.rank == 0


def world() -> World:
    """This process's World from torchrun's WORLD_SIZE, RANK and LOCAL_RANK (rank 0 of 1 when
    WORLD_SIZE is unset)."""
    size = _env_int("WORLD_SIZE")
    if size is None or size == 1:
        return World()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or local_rank is None:
        raise ConfigError(
            f"WORLD_SIZE={size} but RANK or LOCAL_RANK is not set; start the processes with "
            "torchrun, which sets all three."
        )
    if not 0 <= rank < size or local_rank < 0:
        raise ConfigError(
            f"environment variables WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local_rank} "
            "do not fit together (need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0)."
        )
    return World(rank, size, local_rank)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer.") from None


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join torchrun's process group for the block: NCCL when ``device`` is CUDA, gloo otherwise.

    Re-entrant: a caller that has joined already keeps its group, and a plain run only gets
    its World.
    """
    here = world()
    if here.size == 1 or dist.is_initialized():
        yield here
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        yield here
    finally:
        dist.destroy_process_group()


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def _device() -> torch.device:
    """Where tensors sent between processes must live: NCCL moves CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here."""
    if _joined():
        dist.barrier()


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over all processes (float64)."""
    if not _joined():
        return [float(v) for v in values]
    total = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    return total.tolist()


def failed_ranks(failed: bool) -> list[int]:
    """The ranks that report a failure; every process learns them, so none waits on a dead one."""
    here = world()
    flags = [0.0] * here.size
    flags[here.rank] = float(failed)
    return [rank for rank, flag in enumerate(all_sum(flags)) if flag]


def batch_shard(n: int, batch_size: int, rank: int, size: int) -> np.ndarray:
    """Positions in [0, n) of rank's whole batches: batches rank, rank + size, ... of the
    single-process order, so each batch holds the same samples as in a plain run. (m,) int64."""
    return np.flatnonzero(np.arange(n) // batch_size % size == rank)


def gather_rows(local: torch.Tensor, n: int, batch_size: int) -> torch.Tensor:
    """All ``n`` rows ``(n, ...)`` on every process, from each process's ``local`` rows at its
    ``batch_shard`` positions."""
    if not _joined():
        return local
    size = dist.get_world_size()
    shards = [batch_shard(n, batch_size, rank, size) for rank in range(size)]
    # all_gather wants equal shapes: pad every shard to the longest
    padded = torch.zeros((max(map(len, shards)), *local.shape[1:]), dtype=local.dtype)
    padded[: len(local)] = local
    padded = padded.to(_device())
    parts = [torch.empty_like(padded) for _ in shards]
    dist.all_gather(parts, padded)
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for rows, part in zip(shards, parts, strict=True):
        out[torch.from_numpy(rows)] = part[: len(rows)].cpu()
    return out
