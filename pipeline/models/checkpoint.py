"""Fine-tuned checkpoints: safetensors weights plus `model.json`, the `CheckpointRecord` that
says what made them. The record is validated whole on load (every field, its type, the
preprocessing record), and the weights' sha256 is checked against it."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline import layout
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.registry import BackboneInfo, create_backbone
from pipeline.storage.atomic import atomic_dir
from pipeline.storage.hashing import file_sha256
from pipeline.storage.outputs import ArtifactFolder

WEIGHTS = "model.safetensors"
SIDECAR = "model.json"
# what `defuse finetune --out` may replace: an earlier checkpoint, its fold models included
CHECKPOINT_FOLDER = ArtifactFolder.of("checkpoint", SIDECAR, WEIGHTS, layout.FOLDS)
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CheckpointRecord:
    """What `model.json` holds: the one record of a fine-tuned checkpoint."""

    backbone: str
    class_names: tuple[str, ...]  # the classifier's outputs, in order
    dim: int  # embedding size
    preprocessing: Preprocessing  # what the model was fine-tuned on; extract and predict use it
    params: dict  # the `finetune` params used (`config.asdict`)
    world_size: int  # BatchNorm statistics are per process: it shapes the weights
    best_epoch: int
    val_metrics: dict  # accuracy, f1_macro, n of the best epoch
    manifest_sha256: str  # the manifest it was fine-tuned on
    held_out: (
        tuple[str, ...] | None
    )  # a cross-fitting fold model: the train sample ids it never saw
    versions: str  # JSON text of the library versions (`runtime.library_versions`)
    weights_sha256: str = ""  # of model.safetensors; "" until `save_checkpoint` writes them

    @property
    def info(self) -> BackboneInfo:
        """The backbone as this checkpoint has it: embedding size and preprocessing."""
        return BackboneInfo(self.backbone, self.dim, self.preprocessing)

    @property
    def cross_fit(self) -> int:
        """K fold models in `folds/` beside this one (0: none)."""
        return self.params["cross_fit"]

    def to_json(self) -> str:
        """`model.json`'s text; the preprocessing record nested whole. No clock time: DVC hashes
        the checkpoint, so the same weights must give the same bytes."""
        data = asdict(self) | {"preprocessing": json.loads(self.preprocessing.to_json())}
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str | Path = SIDECAR) -> CheckpointRecord:
        """The record in ``text``; CheckpointError naming ``where`` and the field at fault."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{where} is not valid JSON: {exc}") from None
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            missing = sorted(set(names) - set(data)) if isinstance(data, dict) else names
            extra = sorted(set(data) - set(names)) if isinstance(data, dict) else []
            raise CheckpointError(
                f"{where}: not a checkpoint record of this defuse (missing {missing}, unknown "
                f"{extra}; got {got}); re-run `defuse finetune`."
            )
        for name, check in _CHECKS.items():
            if not check(data[name]):
                raise CheckpointError(f"{where}: field {name!r} is invalid: {data[name]!r}.")
        try:
            preprocessing = Preprocessing.from_json(
                data["preprocessing"], f"{where}: preprocessing"
            )
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
        held_out = data["held_out"]
        return cls(
            **data
            | {
                "class_names": tuple(data["class_names"]),
                "preprocessing": preprocessing,
                "held_out": None if held_out is None else tuple(held_out),
            }
        )


def _is(*types):
    return lambda v: isinstance(v, types) and not isinstance(v, bool)


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


_CHECKS = {  # JSON-level type of each field but preprocessing (its own record checks it)
    "backbone": _is(str),
    "class_names": lambda v: _strings(v) and len(v) >= 1,
    "dim": lambda v: _is(int)(v) and v >= 1,
    "params": lambda v: isinstance(v, dict) and _is(int)(v.get("cross_fit")),
    "world_size": lambda v: _is(int)(v) and v >= 1,
    "best_epoch": lambda v: _is(int)(v) and v >= 1,
    "val_metrics": _is(dict),
    "manifest_sha256": lambda v: isinstance(v, str) and bool(_SHA256.fullmatch(v)),
    "held_out": lambda v: v is None or _strings(v),
    "versions": _is(str),
    "weights_sha256": lambda v: isinstance(v, str) and bool(_SHA256.fullmatch(v)),
}


def save_checkpoint(
    model: torch.nn.Module, directory: Path, record: CheckpointRecord
) -> CheckpointRecord:
    """Write weights + `model.json` into a temp folder, then swap it into ``directory``.

    An interrupted run leaves either the old checkpoint or the new one, never half of one.
    Returns the record as written: ``record`` with the weights' sha256.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(directory) as tmp:
        save_file(state, tmp / WEIGHTS)
        record = replace(record, weights_sha256=file_sha256(tmp / WEIGHTS))
        (tmp / SIDECAR).write_text(record.to_json())
    return record


def read_record(directory: Path) -> CheckpointRecord:
    """The validated record of the checkpoint in ``directory`` (weights not read)."""
    path = Path(directory) / SIDECAR
    if not path.is_file():
        raise CheckpointError(
            f"No checkpoint at {directory}: {SIDECAR} is missing (run `defuse finetune`)."
        )
    return CheckpointRecord.from_json(path.read_text(), path)


def load_checkpoint(
    directory: Path, verify: bool = True
) -> tuple[torch.nn.Module, CheckpointRecord]:
    """The fine-tuned model in eval mode and its record; the weights' sha256 is checked."""
    directory = Path(directory)
    record = read_record(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint at {directory} is incomplete.")
    if verify and file_sha256(weights) != record.weights_sha256:
        raise CheckpointError(
            f"{weights} does not match the sha256 in {directory / SIDECAR}: the file was changed "
            "or truncated. Re-run `defuse finetune` or pull it again."
        )
    model = create_backbone(record.backbone, len(record.class_names), pretrained=False, quiet=True)
    try:
        model.load_state_dict(load_file(weights))
    except RuntimeError as exc:
        raise CheckpointError(
            f"{weights} does not fit backbone {record.backbone!r}: {exc}"
        ) from exc
    return model.eval(), record
