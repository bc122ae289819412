"""params.yaml as frozen dataclasses: one per stage section, checked as they are built.

params.yaml is the one source of hyper-parameters: a section must give every key of its
dataclass (there are no defaults here to fall back on), with the field's type (a bool is
YAML's true / false, not the text "false"; an int is not 1.5), and nothing else. A missing
file, malformed YAML, an unknown section or one that is not a mapping is an error naming
the file; a bad value is an error naming the key, the value and what is allowed.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from pipeline.errors import ConfigError
from pipeline.models.preprocessing import RESIZE_MODES
from pipeline.validation import (
    check_at_least,
    check_choice,
    check_device,
    check_jobs,
    check_open_unit,
    check_probability,
    shown,
    typed,
    unknown_names,
)

PARAMS_FILE = Path("params.yaml")
# The sections of a params file; `backbones` and `heads` map names to mappings of keys.
SECTIONS = (
    "prepare",
    "finetune",
    "backbones",
    "extract",
    "fuse",
    "heads",
    "evaluate",
    "review",
    "compare",
)
SOURCES = ("elpv", "folder", "csv")
BLOCK_NORMS = ("none", "standardize", "l2")  # per-backbone treatment of fused embeddings
SELECT_BY = ("log_loss", "accuracy", "f1_macro")  # val scores that pick a head's candidate
# extract.engine: what runs the backbones at inference; auto: onnxruntime on the CPU, torch
# on CUDA (`pipeline.engine.engine_for`)
ENGINES = ("auto", "torch", "onnxruntime")


class _Section:
    """Base of the section dataclasses: each value is checked against its field's type (and
    lists become tuples, ints floats where a float is wanted), then `_check` checks ranges."""

    SECTION: ClassVar[str]

    def __post_init__(self):
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in typed(type(self), values, self.SECTION).items():
            object.__setattr__(self, key, value)
        self._check()

    def _check(self) -> None:
        pass


@dataclass(frozen=True)
class PrepareParams(_Section):
    SECTION: ClassVar[str] = "prepare"

    source: str  # "elpv" (the package), "folder" (a sub-folder per class), "csv"
    root: str | None  # the image folder when source is "folder"
    classes: tuple[str, ...] | None  # folder / csv: explicit class list and label order
    elpv_classes: int  # elpv: 4 = defect probability 0, 1/3, 2/3, 1; 2 = functional/defective
    test_fraction: float
    val_fraction: float  # carved from what remains after test, for model selection
    seed: int
    on_bad_image: str  # "error" stops; "skip" lists the file in skipped.csv
    max_pixels: int  # decompression-bomb guard (2560x1920 is 4.9 M)
    # Users' data as they have it: a labels file, file patterns, near-duplicate grouping.
    labels: str | None  # csv: the labels file; its image paths are relative to its folder
    include: tuple[str, ...] | None  # folder / csv: globs a file must match (any of them)
    exclude: tuple[str, ...] | None  # folder / csv: globs that leave a file out
    near_duplicate_bits: int | None  # pHash distance (of 64 bits) that groups; None: off

    def _check(self):
        check_choice("prepare.source", self.source, SOURCES)
        check_choice("prepare.on_bad_image", self.on_bad_image, ("error", "skip"))
        check_choice("prepare.elpv_classes", self.elpv_classes, (2, 4))
        check_open_unit("prepare.test_fraction", self.test_fraction)
        check_open_unit("prepare.val_fraction", self.val_fraction)
        if self.source == "folder" and not self.root:
            raise ConfigError(
                "prepare.root must name the image folder when prepare.source is 'folder'."
            )
        check_at_least("prepare.seed", self.seed, 0)
        check_at_least("prepare.max_pixels", self.max_pixels, 1)
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
            if not all(p for p in patterns):
                raise ConfigError(
                    f"prepare.{name} must be a list of glob patterns such as ['*.jpg']. "
                    f"Got {list(patterns)!r}."
                )
        bits = self.near_duplicate_bits
        # Unrelated images differ in about 32 of the 64 bits: a radius that large groups them.
        if bits is not None and not 0 <= bits < 32:
            raise ConfigError(
                f"prepare.near_duplicate_bits must be null (off) or an int in [0, 32). "
                f"Got {bits!r}."
            )


@dataclass(frozen=True)
class FinetuneParams(_Section):
    """Shared by every backbone; params.yaml's `backbones.<name>` mapping overrides keys."""

    SECTION: ClassVar[str] = "finetune"

    epochs: int
    batch_size: int
    eval_batch_size: int
    optimizer: str  # "rmsprop" (the fusion paper), "sgd" (the attention paper) or "adamw"
    lr: float
    lr_final: float  # cosine decay from lr to lr_final over the epochs
    momentum: float
    weight_decay: float
    dropout: float  # before the new n-class layer, as in the paper
    frozen_stages: int  # leading stages (timm group_matcher blocks) kept at ImageNet weights
    class_weighted: bool  # inverse-frequency loss weights
    hflip: bool
    vflip: bool
    rotation: float  # degrees either way; the papers rotate by any angle (180)
    color_jitter: float  # brightness / contrast / saturation strength
    input_size: int | None  # None: the backbone's native size
    pretrained: bool
    weights: str | None  # a local ImageNet weights file; wins over packages and the hub
    num_workers: int
    device: str  # "auto" picks cuda when present
    seed: int
    cross_fit: int  # K > 1: also K fold models, whose out-of-fold embeddings train the heads
    resize: str  # non-square images: stretch, letterbox (pad) or center_crop

    def _check(self):
        check_choice("finetune.optimizer", self.optimizer, ("rmsprop", "sgd", "adamw"))
        check_choice("finetune.resize", self.resize, RESIZE_MODES)
        if self.cross_fit == 1 or self.cross_fit < 0:
            raise ConfigError(
                f"finetune.cross_fit must be 0 (off) or an int >= 2. Got {self.cross_fit!r}."
            )
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_at_least(f"finetune.{name}", getattr(self, name), 1)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"finetune.dropout must be in [0, 1). Got {self.dropout!r}.")
        for name in ("lr", "lr_final"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"finetune.{name} must be > 0. Got {getattr(self, name)!r}.")
        for name in ("momentum", "weight_decay", "rotation", "color_jitter", "frozen_stages"):
            check_at_least(f"finetune.{name}", getattr(self, name), 0)
        if self.input_size is not None:
            check_at_least("finetune.input_size", self.input_size, 1)
        check_at_least("finetune.num_workers", self.num_workers, 0)
        check_device("finetune.device", self.device)
        check_at_least("finetune.seed", self.seed, 0)


@dataclass(frozen=True)
class ExtractParams(_Section):
    SECTION: ClassVar[str] = "extract"

    batch_size: int
    dtype: str  # "float32" or "float16" (half the cache)
    tta: bool  # mean embedding over horizontal and vertical flips
    num_workers: int
    device: str
    engine: str  # "auto", "torch", or "onnxruntime" (CPU only): what runs the backbones

    def _check(self):
        check_choice("extract.dtype", self.dtype, ("float32", "float16"))
        check_choice("extract.engine", self.engine, ENGINES)
        if self.engine == "onnxruntime" and self.device.startswith("cuda"):
            raise ConfigError(
                f"extract.engine 'onnxruntime' runs on the CPU only; extract.device is "
                f"{self.device!r}: set extract.engine: torch (the engine on CUDA), or "
                "extract.device: cpu."
            )
        check_at_least("extract.batch_size", self.batch_size, 1)
        check_at_least("extract.num_workers", self.num_workers, 0)
        check_device("extract.device", self.device)


@dataclass(frozen=True)
class FuseParams(_Section):
    SECTION: ClassVar[str] = "fuse"

    backbones: tuple[str, ...] | None  # concatenation order; None: every entry of `backbones`
    seed: int
    seeds: tuple[int, ...]  # the head refitted per seed (selection included), saved beside it
    # Fused features (all rows, float32) larger than this stay in the caches: heads that
    # stream (mlp) read them block by block, the others stop with an error. A fixed size, not
    # a share of RAM: streaming shuffles differently, and the same params must give the same
    # head on every machine.
    memory_gb: float
    block_norm: str  # per-backbone block treatment: none | standardize | l2 (+ standardize)
    select_by: str  # val score that picks among a head's candidates
    refit: bool  # refit the chosen candidate on train + val
    n_jobs: int  # processes fitting a head's candidates

    def _check(self):
        check_at_least("fuse.seed", self.seed, 0)
        if not self.seeds or min(self.seeds) < 0 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(
                f"fuse.seeds must be a non-empty list of distinct ints >= 0. Got {list(self.seeds)!r}."
            )
        if self.memory_gb <= 0:
            raise ConfigError(f"fuse.memory_gb must be a number > 0. Got {self.memory_gb!r}.")
        check_choice("fuse.block_norm", self.block_norm, BLOCK_NORMS)
        check_choice("fuse.select_by", self.select_by, SELECT_BY)
        check_jobs("fuse.n_jobs", self.n_jobs)

    @property
    def max_bytes(self) -> int:
        return int(self.memory_gb * 1e9)


@dataclass(frozen=True)
class EvaluateParams(_Section):
    SECTION: ClassVar[str] = "evaluate"

    final_head: str  # the head `predict` and `export` use and the summary headlines: an entry
    # of `heads`, or "auto": the head with the best val score (`final_head`, fusion/selection.py)
    bootstrap_draws: int  # paired-bootstrap resamplings of the test images
    bootstrap_seed: int
    gallery: int  # the final head's most confident test errors pictured, with Grad-CAM; 0 = off
    device: str  # where the gallery's Grad-CAM runs; "auto" picks cuda when present

    def _check(self):
        check_device("evaluate.device", self.device)
        check_at_least("evaluate.bootstrap_draws", self.bootstrap_draws, 1)
        check_at_least("evaluate.bootstrap_seed", self.bootstrap_seed, 0)
        check_at_least("evaluate.gallery", self.gallery, 0)


@dataclass(frozen=True)
class ReviewParams(_Section):
    SECTION: ClassVar[str] = "review"

    below: float | None  # predict / the export's runtime flag answers less sure than this
    defect_free: tuple[str, ...] | None  # classes that count as a good part; None: no such table
    rates: tuple[float, ...]  # review rates (fractions of images) the report's table shows

    def _check(self):
        if self.below is not None:
            check_probability("review.below", self.below)
        if not self.rates or not all(0.0 <= r < 1.0 for r in self.rates):
            raise ConfigError(
                f"review.rates must be a non-empty list of fractions in [0, 1). Got {list(self.rates)!r}."
            )

    def check_classes(self, class_names: list[str], where: Path | str) -> None:
        """ConfigError unless every `defect_free` class is one of the dataset's, and at least
        one class is left to count as defective."""
        unknown = [c for c in self.defect_free or () if c not in class_names]
        if unknown:
            raise ConfigError(
                f"{where}: review.defect_free names {unknown}, not classes of this dataset "
                f"{list(class_names)}; name its defect-free classes, or null to leave the table out."
            )
        if self.defect_free and set(self.defect_free) >= set(class_names):
            raise ConfigError(
                f"{where}: review.defect_free names every class {list(class_names)}; "
                "at least one must count as defective."
            )


@dataclass(frozen=True)
class CompareParams(_Section):
    SECTION: ClassVar[str] = "compare"

    folds: int  # nested k-fold over the val rows; test is touched only for the pick
    min_subset: int  # smallest backbone subset to try
    seed: int
    n_jobs: int  # processes sharing the fits

    def _check(self):
        check_at_least("compare.folds", self.folds, 2)
        check_at_least("compare.min_subset", self.min_subset, 1)
        check_at_least("compare.seed", self.seed, 0)
        check_jobs("compare.n_jobs", self.n_jobs)


def load_params(path: Path | str = PARAMS_FILE) -> dict[str, dict]:
    """The params file as a mapping of sections, each a mapping (the entries of `backbones`
    and `heads` too). ConfigError naming the file when it is missing or not valid YAML, or
    holds an unknown section or one that is not a mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such params file. Every stage reads its hyper-parameters from it: run "
            "from the project folder, or pass --params (pipeline/presets/ holds the papers')."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the params file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {' '.join(problem.split())}.") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must be a mapping of sections {list(SECTIONS)}; got {shown(data)}."
        )
    unknown = [name for name in data if name not in SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: {unknown_names('section', unknown, SECTIONS)}")
    for name, body in data.items():
        if not isinstance(body, dict):
            raise ConfigError(
                f"{path}: section {name!r} must be a mapping of keys; got {shown(body)}."
            )
    for name in ("backbones", "heads"):
        for entry, body in (data.get(name) or {}).items():
            if not isinstance(body, dict):
                raise ConfigError(
                    f"{path}: {name}.{entry} must be a mapping of keys ({{}} for none); "
                    f"got {shown(body)}."
                )
    return data


def section(cls: type, name: str, path: Path | str = PARAMS_FILE, **overrides):
    """The ``name`` section of the params file as ``cls``; ``overrides`` that are not None
    (command-line options) replace its values."""
    data = _section(load_params(path), name, path) | _given(overrides)
    return from_dict(cls, data, name, path)


def finetune_params(backbone: str, path: Path | str = PARAMS_FILE, **overrides) -> FinetuneParams:
    """The `finetune` section with the keys of `backbones.<backbone>` (if it is listed) and
    then the ``overrides`` that are not None laid over it."""
    params = load_params(path)
    own = dict(_section(params, "backbones", path).get(backbone, {}))
    label = f"backbones.{backbone}"
    if "family" in own:
        _check_family(backbone, own.pop("family"), path)
    _check_keys(FinetuneParams, own, label, path)
    with _in_file(path):
        typed(FinetuneParams, own, label)  # a bad value is named where it was written
    data = _section(params, "finetune", path) | own | _given(overrides)
    return from_dict(FinetuneParams, data, "finetune", path)


FAMILIES = Path(__file__).parent / "models" / "families"


def _check_family(backbone: str, family, path: Path | str) -> None:
    """`backbones.<backbone>.family` must name the module under models/families/ that
    registers ``backbone``: dvc.yaml reruns its stages when that file changes, and only then.
    The files are read, not imported, so that reading params needs no torch."""
    found = [f.stem for f in sorted(FAMILIES.glob("*.py")) if backbone in _registered_in(f)]
    if family not in found:
        where = (
            f"pipeline/models/families/{found[0]}.py; write family: {found[0]}"
            if found
            else "no module of pipeline/models/families/"
        )
        raise ConfigError(
            f"{path}: backbones.{backbone}.family is {family!r}, but {backbone!r} is "
            f"registered in {where}."
        )


def _registered_in(family_file: Path) -> set[str]:
    """Names of the functions ``family_file`` registers with `@register_backbone`."""
    return {
        node.name
        for node in ast.parse(family_file.read_text()).body
        if isinstance(node, ast.FunctionDef)
        and any(getattr(d, "id", None) == "register_backbone" for d in node.decorator_list)
    }


AUTO = "auto"  # evaluate.final_head: chosen on val among the heads


def evaluate_params(path: Path | str = PARAMS_FILE, **overrides) -> EvaluateParams:
    """The `evaluate` section, whose `final_head` must be an entry of `heads` or "auto"."""
    params = section(EvaluateParams, "evaluate", path, **overrides)
    heads = list(_section(load_params(path), "heads", path))
    if params.final_head not in (AUTO, *heads):
        raise ConfigError(
            f"{path}: evaluate.final_head is {params.final_head!r}, not an entry of heads; "
            f"name one of {heads}, or {AUTO!r} (the best on val)."
        )
    return params


def backbone_names(path: Path | str = PARAMS_FILE) -> list[str]:
    """The `backbones` mapping's keys: what the DAG trains, in concatenation order."""
    names = list(_section(load_params(path), "backbones", path))
    if not names:
        raise ConfigError(f"{path}: backbones is empty; list at least one backbone.")
    return names


def head_names(path: Path | str = PARAMS_FILE) -> list[str]:
    """The `heads` mapping's keys: every head fuse trains and evaluate scores."""
    return list(_section(load_params(path), "heads", path) or {})


def head_params(head: str, path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """Constructor arguments (or grids of them) of ``head``: its entry in `heads`."""
    heads = _section(load_params(path), "heads", path)
    if head not in heads:
        raise ConfigError(f"{path}: heads has no entry {head!r}; its entries: {list(heads)}.")
    return dict(heads[head])


def from_dict(cls: type, data: dict[str, Any], section: str, where: Path | str):
    """Build dataclass ``cls`` from ``data``, section ``section`` of params file ``where``:
    every field must be given, and nothing else; `cls` then checks types and ranges."""
    _check_keys(cls, data, section, where)
    missing = [f.name for f in fields(cls) if f.name not in data]
    if missing:
        raise ConfigError(
            f"{where}: section {section!r} lacks key(s) {missing}; params.yaml gives every "
            "value (the project's params.yaml says what each one means)."
        )
    with _in_file(where):
        return cls(**data)


def asdict(params) -> dict[str, Any]:
    """Plain-JSON form of a params dataclass, for sidecars."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()
    }


def _section(params: dict[str, dict], name: str, path: Path | str) -> dict[str, Any]:
    if name not in params:
        raise ConfigError(f"{path}: no {name!r} section; the stages read {list(SECTIONS)}.")
    return params[name]


@contextlib.contextmanager
def _in_file(where: Path | str) -> Iterator[None]:
    """Prefix the file to the ConfigError of a bad value."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if v is not None}


def _check_keys(cls: type, data: dict[str, Any], label: str, where: Path | str) -> None:
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: in {label!r}, {unknown_names('key', unknown, allowed)}")
