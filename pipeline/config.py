"""params.yaml as frozen dataclasses: one per stage section, unknown keys rejected.

Every hyper-parameter lives in params.yaml; the defaults below only document the types and
make a partial params file usable in tests and notebooks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

PARAMS_FILE = Path("params.yaml")
SOURCES = ("elpv", "folder", "csv")
RESIZE_MODES = ("stretch", "letterbox", "center_crop")  # how a non-square image meets the input


@dataclass(frozen=True)
class PrepareParams:
    source: str = "elpv"  # "elpv" (the package), "folder" (a sub-folder per class), "csv"
    root: str | None = None  # the image folder when source is "folder"
    classes: tuple[str, ...] | None = None  # folder / csv: explicit class list and label order
    elpv_classes: int = 4  # elpv: 4 = defect probability 0, 1/3, 2/3, 1; 2 = functional/defective
    test_fraction: float = 0.12  # the fusion paper's 1879 / 257 split
    val_fraction: float = 0.15  # carved from what remains after test, for model selection
    seed: int = 0
    on_bad_image: str = "error"  # "error" stops; "skip" lists the file in skipped.csv
    max_pixels: int = 64_000_000  # decompression-bomb guard (2560x1920 is 4.9 M)
    # Users' data as they have it: a labels file, file patterns, near-duplicate grouping.
    labels: str | None = None  # csv: the labels file; its image paths are relative to its folder
    include: tuple[str, ...] | None = None  # folder / csv: globs a file must match (any of them)
    exclude: tuple[str, ...] | None = None  # folder / csv: globs that leave a file out
    near_duplicate_bits: int | None = 4  # pHash distance (of 64 bits) that groups; None: off

    def __post_init__(self):
        _choice("prepare.source", self.source, SOURCES)
        _choice("prepare.on_bad_image", self.on_bad_image, ("error", "skip"))
        _choice("prepare.elpv_classes", self.elpv_classes, (2, 4))
        _open_unit("prepare.test_fraction", self.test_fraction)
        _open_unit("prepare.val_fraction", self.val_fraction)
        if self.source == "folder" and not self.root:
            raise ConfigError(
                "prepare.root must name the image folder when prepare.source is 'folder'."
            )
        if self.max_pixels <= 0:
            raise ConfigError(f"prepare.max_pixels must be positive. Got {self.max_pixels}.")
        self._check_user_data()

    def _check_user_data(self):
        """The labels file, the file patterns and the near-duplicate radius."""
        if self.source == "csv":
            if not self.labels:
                raise ConfigError(
                    "prepare.labels must name the labels file (path,label[,split]) when "
                    "prepare.source is 'csv'."
                )
            if self.root is not None:
                raise ConfigError(
                    f"prepare.root must be null when prepare.source is 'csv' (image paths are "
                    f"relative to the labels file's folder). Got {self.root!r}."
                )
        elif self.labels is not None:
            raise ConfigError(
                f"prepare.labels is for prepare.source 'csv'; source is {self.source!r}. "
                f"Got {self.labels!r}."
            )
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if patterns is None:
                continue
            if self.source == "elpv":
                raise ConfigError(f"prepare.{name} is for the folder and csv sources, not 'elpv'.")
            if not isinstance(patterns, tuple) or not all(
                isinstance(p, str) and p for p in patterns
            ):
                raise ConfigError(
                    f"prepare.{name} must be a list of glob patterns such as ['*.jpg']. "
                    f"Got {patterns!r}."
                )
        bits = self.near_duplicate_bits
        # Unrelated images differ in about 32 of the 64 bits: a radius that large groups them.
        if bits is not None and not (_is_count(bits, 0) and bits < 32):
            raise ConfigError(
                f"prepare.near_duplicate_bits must be null (off) or an int in [0, 32). "
                f"Got {bits!r}."
            )


@dataclass(frozen=True)
class FinetuneParams:
    """Defaults for every backbone; params.yaml's `backbones.<name>` mapping overrides them."""

    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    optimizer: str = "rmsprop"  # the fusion paper; "sgd" for the attention paper
    lr: float = 1e-3
    lr_final: float = 1e-4  # cosine decay from lr to lr_final over the epochs
    momentum: float = 0.0
    weight_decay: float = 0.0
    dropout: float = 0.5  # before the new n-class layer, as in the paper
    frozen_stages: int = 0  # leading stages (timm group_matcher blocks) kept at ImageNet weights
    class_weighted: bool = True  # inverse-frequency loss weights for imbalanced sets like ELPV
    hflip: bool = True
    vflip: bool = True
    rotation: float = 180.0  # degrees either way: "rotation by any angle"
    color_jitter: float = 0.2  # brightness / contrast / saturation strength
    input_size: int | None = None  # None: the backbone's native size
    pretrained: bool = True
    weights: str | None = None  # a local ImageNet weights file; wins over packages and the hub
    num_workers: int = 2
    device: str = "auto"  # "auto" picks cuda when present
    seed: int = 0
    cross_fit: int = 0  # K > 1: also K fold models, whose out-of-fold embeddings train the heads
    resize: str = "stretch"  # non-square images: stretch, letterbox (pad) or center_crop

    def __post_init__(self):
        _choice("finetune.optimizer", self.optimizer, ("rmsprop", "sgd", "adamw"))
        _choice("finetune.resize", self.resize, RESIZE_MODES)
        if not _is_count(self.cross_fit, 0) or self.cross_fit == 1:
            raise ConfigError(
                f"finetune.cross_fit must be 0 (off) or an int >= 2. Got {self.cross_fit!r}."
            )
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"finetune.{name} must be >= 1. Got {getattr(self, name)!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"finetune.dropout must be in [0, 1). Got {self.dropout!r}.")
        if self.lr <= 0 or self.lr_final <= 0:
            raise ConfigError(
                f"finetune.lr and lr_final must be > 0. Got {self.lr!r}, {self.lr_final!r}."
            )
        if self.frozen_stages < 0:
            raise ConfigError(f"finetune.frozen_stages must be >= 0. Got {self.frozen_stages!r}.")


@dataclass(frozen=True)
class ExtractParams:
    batch_size: int = 64
    dtype: str = "float32"  # "float16" halves the cache for a negligible loss
    tta: bool = False  # mean embedding over horizontal and vertical flips
    num_workers: int = 2
    device: str = "auto"

    def __post_init__(self):
        _choice("extract.dtype", self.dtype, ("float32", "float16"))
        if self.batch_size < 1:
            raise ConfigError(f"extract.batch_size must be >= 1. Got {self.batch_size!r}.")


@dataclass(frozen=True)
class FuseParams:
    backbones: tuple[str, ...] | None = (
        None  # concatenation order; None: every entry of `backbones`
    )
    seed: int = 0
    # Fused features (all rows, float32) larger than this stay in the caches: heads that
    # stream (mlp) read them block by block, the others stop with an error. A fixed size, not
    # a share of RAM: streaming shuffles differently, and the same params must give the same
    # head on every machine.
    memory_gb: float = 2.0
    block_norm: str = "l2"  # per-backbone block treatment: none | standardize | l2 (+ standardize)
    select_by: str = "accuracy"  # val score that picks among a head's candidates
    refit: bool = True  # refit the chosen candidate on train + val
    n_jobs: int = 1  # processes fitting a head's candidates

    def __post_init__(self):
        if isinstance(self.memory_gb, bool) or not (
            isinstance(self.memory_gb, int | float) and self.memory_gb > 0
        ):
            raise ConfigError(f"fuse.memory_gb must be a number > 0. Got {self.memory_gb!r}.")
        _choice("fuse.block_norm", self.block_norm, ("none", "standardize", "l2"))
        _choice("fuse.select_by", self.select_by, ("log_loss", "accuracy", "f1_macro"))
        _choice("fuse.refit", self.refit, (True, False))
        if isinstance(self.n_jobs, bool) or not isinstance(self.n_jobs, int) or self.n_jobs == 0:
            raise ConfigError(
                f"fuse.n_jobs must be an int >= 1, or -1 for every core. Got {self.n_jobs!r}."
            )

    @property
    def max_bytes(self) -> int:
        return int(self.memory_gb * 1e9)


@dataclass(frozen=True)
class EvaluateParams:
    final_head: str = "mlp"  # the head `predict` uses and the summary headlines
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # each head refitted per seed: mean +- std on test
    bootstrap_draws: int = 10_000  # paired-bootstrap resamplings of the test images
    bootstrap_seed: int = 0

    def __post_init__(self):
        if not self.seeds or not all(_is_count(s, 0) for s in self.seeds):
            raise ConfigError(
                f"evaluate.seeds must be a non-empty list of ints >= 0. Got {self.seeds!r}."
            )
        if not _is_count(self.bootstrap_draws, 1):
            raise ConfigError(
                f"evaluate.bootstrap_draws must be an int >= 1. Got {self.bootstrap_draws!r}."
            )


def _is_count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class CompareParams:
    folds: int = 5  # nested k-fold over the val rows; test is touched only for the pick
    min_subset: int = 1  # smallest backbone subset to try
    seed: int = 0
    n_jobs: int = 2  # processes sharing the fits (one per core here)

    def __post_init__(self):
        if self.folds < 2:
            raise ConfigError(f"compare.folds must be >= 2. Got {self.folds!r}.")
        if isinstance(self.n_jobs, bool) or not isinstance(self.n_jobs, int) or self.n_jobs == 0:
            raise ConfigError(
                f"compare.n_jobs must be an int >= 1, or -1 for every core. Got {self.n_jobs!r}."
            )


def backbone_names(path: Path | str = PARAMS_FILE) -> list[str]:
    """The `backbones` mapping's keys: what the DAG trains, in concatenation order."""
    return list((load_params(path).get("backbones") or {}).keys())


def finetune_params(backbone: str, path: Path | str = PARAMS_FILE, **overrides) -> FinetuneParams:
    """`finetune` defaults merged with `backbones.<backbone>`, then non-None ``overrides``."""
    params = load_params(path)
    data = dict(params.get("finetune") or {})
    data.update((params.get("backbones") or {}).get(backbone) or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(FinetuneParams, data, f"finetune + backbones.{backbone}")


def head_params(head: str, path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """Constructor arguments of ``head`` from the `heads` mapping (empty when absent)."""
    return dict((load_params(path).get("heads") or {}).get(head) or {})


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(
            f"The {name!r} parameter must be one of {list(allowed)}. Got {value!r} instead."
        )


def _open_unit(name: str, value: float) -> None:
    if not 0.0 < float(value) < 1.0:
        raise ConfigError(
            f"The {name!r} parameter must be a fraction in (0, 1). Got {value!r} instead."
        )


def from_dict(cls: type, data: dict[str, Any] | None, section: str):
    """Build dataclass ``cls`` from ``data``; unknown keys raise a ConfigError naming them."""
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"Unknown key(s) {unknown} in params section {section!r}; allowed: {sorted(known)}."
        )
    for name, value in data.items():
        if isinstance(value, list):
            data[name] = tuple(value)
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"params section {section!r}: {exc}") from exc


def load_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """The raw params.yaml mapping; an absent file is an empty mapping (library defaults)."""
    path = Path(path)
    if not path.exists():
        return {}
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}.")
    return data


def section(cls: type, name: str, path: Path | str = PARAMS_FILE, **overrides):
    """The ``name`` section of params.yaml as ``cls``; ``overrides`` that are not None win."""
    data = dict(load_params(path).get(name) or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data, name)


def asdict(params) -> dict[str, Any]:
    """Plain-JSON form of a params dataclass, for sidecars."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()
    }
