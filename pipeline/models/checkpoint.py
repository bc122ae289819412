"""Fine-tuned checkpoints: safetensors weights plus a JSON sidecar that says what made them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import RESIZE_MODES
from pipeline.errors import CheckpointError
from pipeline.models.registry import BackboneInfo, create_backbone
from pipeline.storage.atomic import atomic_dir
from pipeline.storage.hashing import file_sha256

WEIGHTS = "model.safetensors"
SIDECAR = "model.json"


def save_checkpoint(model: torch.nn.Module, directory: Path, sidecar: dict) -> dict:
    """Write weights + sidecar into a temp folder, then swap it into ``directory``.

    An interrupted run leaves either the old checkpoint or the new one, never half of one.
    Returns the sidecar as written (with ``weights_sha256`` added).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(directory) as tmp:
        save_file(state, tmp / WEIGHTS)
        sidecar = {**sidecar, "weights_sha256": file_sha256(tmp / WEIGHTS)}
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def read_sidecar(directory: Path) -> dict:
    path = Path(directory) / SIDECAR
    if not path.is_file():
        raise CheckpointError(
            f"No checkpoint at {directory}: {SIDECAR} is missing (run `defuse finetune`)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def load_checkpoint(directory: Path, verify: bool = True) -> tuple[torch.nn.Module, dict]:
    """The fine-tuned model in eval mode and its sidecar; the weights' sha256 is checked."""
    directory = Path(directory)
    sidecar = read_sidecar(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint at {directory} is incomplete.")
    if verify and file_sha256(weights) != sidecar.get("weights_sha256"):
        raise CheckpointError(
            f"{weights} does not match the sha256 in {directory / SIDECAR}: the file was changed "
            "or truncated. Re-run `defuse finetune` or pull it again."
        )
    model = create_backbone(
        sidecar["backbone"], len(sidecar["class_names"]), pretrained=False, quiet=True
    )
    try:
        model.load_state_dict(load_file(weights))
    except RuntimeError as exc:
        raise CheckpointError(
            f"{weights} does not fit backbone {sidecar['backbone']!r}: {exc}"
        ) from exc
    return model.eval(), sidecar


def backbone_info_of(sidecar: dict) -> BackboneInfo:
    """The eval preprocessing the checkpoint was trained with (travels with the weights)."""
    # Sidecars written before finetune.resize existed come from stretched images.
    resize = sidecar.get("resize", "stretch")
    if resize not in RESIZE_MODES:
        raise CheckpointError(
            f"Checkpoint of {sidecar['backbone']!r}: resize {resize!r} is not one of "
            f"{list(RESIZE_MODES)}; the sidecar is damaged or from a newer defuse."
        )
    return BackboneInfo(
        name=sidecar["backbone"],
        input_size=sidecar["input_size"],
        mean=tuple(sidecar["mean"]),
        std=tuple(sidecar["std"]),
        interpolation=sidecar["interpolation"],
        dim=sidecar["dim"],
        resize=resize,
    )
