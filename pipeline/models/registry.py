"""Backbone registry: one decorated function per CNN, each returning a model with timm's
interface, in its family's module under `pipeline/models/families/` (found by discovery, so a
new family is a new file and nothing else). Also what a backbone is without its weights
(`BackboneInfo`: embedding size and preprocessing record), its embedding, and stage freezing.
"""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from timm.models import group_parameters
from torch import nn

import pipeline.models.families
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.weights import HubUnavailable

log = logging.getLogger(__name__)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn(*, num_classes, pretrained, weights, drop_rate)`` under its own name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"Backbone {fn.__name__!r} is registered twice.")
    _REGISTRY[fn.__name__] = fn
    return fn


@functools.cache
def _discover() -> None:
    """Import every family module, which registers its backbones. No static import lists
    them: DVC reruns a backbone's stages for its own family file only (see dvc.yaml)."""
    package = pipeline.models.families
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def list_backbones() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def family_of(name: str) -> str:
    """The family module ``name`` is registered in: `pipeline/models/families/<family>.py`."""
    return _entry(name).__module__.rsplit(".", 1)[-1]


def _entry(name: str) -> Callable[..., nn.Module]:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"Unknown backbone {name!r}; registered backbones: {list_backbones()}.")
    return _REGISTRY[name]


def create_backbone(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    drop_rate: float = 0.5,
    quiet: bool = False,
) -> nn.Module:
    """Backbone ``name`` with a ``num_classes``-way classifier after dropout ``drop_rate``.

    ``weights``: a local ImageNet weights file (safetensors or a torch state dict), which wins
    over the offline packages and the hub. ``quiet``: no random-initialisation warning, for
    callers that load fine-tuned weights next. The model maps ``(B, 3, H, W)`` to
    ``(B, num_classes)``.
    """
    entry = _entry(name)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1. Got {num_classes!r}.")
    if not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"drop_rate must be in [0, 1). Got {drop_rate!r}.")
    if not pretrained and not quiet:
        log.warning(
            "Backbone %r: pretrained=False, random initialisation (no ImageNet weights).", name
        )
    try:
        model = entry(
            num_classes=num_classes, pretrained=pretrained, weights=weights, drop_rate=drop_rate
        )
    except HubUnavailable as exc:
        raise CheckpointError(
            f"No ImageNet weights for backbone {name!r}: no local weights file was given, no "
            f"offline package provides them, and the hub failed ({exc}). Set "
            f"backbones.{name}.weights in params.yaml to a local weights file{exc.hint}, "
            "or pretrained: false."
        ) from None
    # A new n-class layer starts near uniform. timm scales its init by 1/sqrt(num_classes),
    # which for a few classes gives logits of ~6 and a first loss of ~10 that wrecks fine-tuning.
    head = model.get_classifier()
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return model


@dataclass(frozen=True)
class BackboneInfo:
    """A backbone without its weights: its embedding size and how an image becomes its input."""

    name: str
    dim: int  # embedding size: what `embed` returns
    preprocessing: Preprocessing


def backbone_info(name: str, input_size: int | None = None) -> BackboneInfo:
    """Embedding size and native preprocessing of ``name`` (timm's `pretrained_cfg`, resize
    "stretch"); ``input_size`` overrides the native size."""
    info = _native_info(name)
    if not input_size:
        return info
    return replace(info, preprocessing=replace(info.preprocessing, input_size=input_size))


@functools.cache
def _native_info(name: str) -> BackboneInfo:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = _entry(name)(num_classes=1, pretrained=False, weights=None, drop_rate=0.0)
    cfg = model.pretrained_cfg
    preprocessing = Preprocessing(
        input_size=int(cfg["input_size"][-1]),
        resize="stretch",  # timm's "squash"; finetune.resize chooses per run
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        interpolation=cfg["interpolation"],
    )
    dim = int(getattr(model, "head_hidden_size", model.num_features))
    return BackboneInfo(name=name, dim=dim, preprocessing=preprocessing)


def embed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logits embedding ``(B, dim)`` and logits ``(B, num_classes)`` of ``(B, 3, H, W)``.

    The trunk runs once. For VGG the embedding is the 4096-d fc7 output, not the 512-d pool.
    """
    embedding = model.forward_head(model.forward_features(x), pre_logits=True)
    return embedding, model.get_classifier()(embedding)


# --- stages and freezing -------------------------------------------------------------------------


def _stages(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters per stage: timm's coarse ``group_matcher`` groups, in order, with the stem
    (group 0) merged into stage 1. The head (the unmatched group, holding the classifier) is no
    stage."""
    matcher = model.group_matcher(coarse=True)
    head = {id(p) for p in model.get_classifier().parameters()}
    groups = group_parameters(model, matcher, return_values=True).values()
    groups = [params for params in groups if not any(id(p) in head for p in params)]
    if len(groups) > 1 and (not isinstance(matcher, dict) or "stem" in matcher):
        groups = [groups[0] + groups[1], *groups[2:]]
    return groups


def num_stages(model: nn.Module) -> int:
    """How many stages ``freeze_stages`` can freeze (see ``_stages``)."""
    return len(_stages(model))


def freeze_stages(model: nn.Module, n: int) -> int:
    """Set ``requires_grad=False`` on the first ``n`` stages; return how many parameters that is.

    Stage k is the k-th "blocks" group of timm's ``group_matcher(coarse=True)``, and stage 1 also
    holds the stem. resnet50: 4 stages (layer1..4); tf_efficientnet_lite*: 7 (blocks.0..6,
    conv_head with the last); shufflenet_v2: 4 (stage2..4, conv5); vgg16: 12 (a conv layer each,
    the stem's two together); inception_v3: 12; xception: 13; inception_v4(_scse): 19 (an SCSE
    goes with its block). The head (the classifier; for vgg16 also fc6/fc7) is never frozen. Call
    ``set_train_mode(model)`` instead of ``model.train()`` so frozen BatchNorms keep their
    ImageNet statistics.
    """
    stages = _stages(model)
    if not 0 <= n <= len(stages):
        arch = model.pretrained_cfg.get("architecture", type(model).__name__)
        raise ConfigError(
            f"frozen_stages={n!r}, but backbone {arch!r} has {len(stages)} stages "
            f"(allowed 0..{len(stages)})."
        )
    frozen = [p for stage in stages[:n] for p in stage]
    for p in frozen:
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen)


def set_train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train(mode)``, but a BatchNorm with no trainable parameter stays in eval mode: its
    running statistics are used as they are and not updated."""
    model.train(mode)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in m.parameters()
        ):
            m.eval()
    return model
