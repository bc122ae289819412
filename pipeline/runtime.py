"""Where and how models run: the process's memory allocator, device choice, mixed precision,
library versions for sidecars. torch loads on first use, so the CLI tunes the allocator
before any tensor exists and `defuse prepare` never loads torch."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the kernel.

    By default glibc serves each block above 32 MB (activations, gradients, batches) with a
    fresh mmap and unmaps it when freed, and trims the heap's free top: the kernel then
    zeroes those pages again at their next touch, a third of `make demo`'s CPU time (324 M
    minor page faults). With mmap off and trimming off (mallopt(3): -1 disables it), a
    process reuses its own pages; its resident memory stays at its peak until it exits,
    which a one-stage process does (`bench/bench_allocator.py`). Called where each process
    starts (the CLI, joblib's workers); False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present; an explicit device that is absent is an error.
    Under torchrun each process takes the GPU of its LOCAL_RANK."""
    import torch

    from pipeline.distributed import world

    here = world()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and here.size > 1:
        if device.index is not None:
            raise ConfigError(
                f"device {name!r} names one GPU for all {here.size} processes torchrun "
                "started; use 'auto' or 'cuda', and each process takes cuda:LOCAL_RANK."
            )
        device = torch.device("cuda", here.local_rank)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'."
        )
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed); plain float32 on CPU, which is faster there."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to ``device`` in channels-last layout: convolutions run faster in it on CUDA and
    on this project's CPUs alike (1.3-2.3x for EfficientNet-Lite on 2 cores)."""
    import torch

    return model.to(device, memory_format=torch.channels_last)


def library_versions(*extra: str) -> str:
    """JSON of the versions that shape numbers in an artifact; ``extra``: libraries beyond
    the usual ones that shaped them too (onnxruntime, when it ran the backbones)."""
    names = ("defuse", "torch", "torchvision", "timm", "numpy", "h5py", "scikit-learn", *extra)
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return json.dumps(versions, sort_keys=True)
