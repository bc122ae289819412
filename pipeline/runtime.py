"""Where and how models run: device choice, mixed precision, library versions for sidecars."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json

import torch

from pipeline.distributed import world
from pipeline.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present; an explicit device that is absent is an error.
    Under torchrun each process takes the GPU of its LOCAL_RANK."""
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
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to ``device`` in channels-last layout: convolutions run faster in it on CUDA and
    on this project's CPUs alike (1.3-2.3x for EfficientNet-Lite on 2 cores)."""
    return model.to(device, memory_format=torch.channels_last)


def library_versions() -> str:
    """JSON of the versions that shape numbers in an artifact."""
    names = ("defuse", "torch", "torchvision", "timm", "numpy", "h5py", "scikit-learn")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return json.dumps(versions, sort_keys=True)
