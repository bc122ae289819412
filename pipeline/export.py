"""The fused model as one ONNX graph (`cache/export/`): each backbone's prepared uint8 input
(B, S, S, 3), the image cache's layout, in; class probabilities out. Normalisation, the
backbones, the extraction's TTA and dtype, the block treatment and the head are all inside,
so a runtime with numpy, Pillow and onnxruntime alone (`pipeline.deploy`, copied into the
folder) classifies images as `defuse predict` does. model.json says what the graph was built
from."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.deploy import CARRIED, FORMAT, GRAPH, RECORD, RUNTIME
from pipeline.engine import PixelBackbone, write_onnx
from pipeline.errors import CheckpointError
from pipeline.fusion.heads import load_head
from pipeline.fusion.heads.artifact import HEAD_FILE, SIDECAR_FILE
from pipeline.metrics import write_json
from pipeline.models.preprocessing import Preprocessing
from pipeline.predict import load_pinned, pinned_checkpoint
from pipeline.storage.atomic import atomic_dir
from pipeline.storage.hashing import file_sha256
from pipeline.storage.outputs import ArtifactFolder

OUTPUT = "probabilities"
# what `--out` of `defuse export` may replace: an earlier export, nothing else
EXPORT_FOLDER = ArtifactFolder.of("export", RECORD, GRAPH, "pipeline")
_SOURCE = Path(__file__).resolve().parents[1]  # the folder holding the pipeline package
TOLERANCE = 1e-4  # largest |onnxruntime - torch| probability accepted at export
_LIBRARIES = ("defuse", "torch", "timm", "onnx", "onnxruntime", "numpy")


class _Branch(nn.Module):
    """One backbone as its feature cache saw it (`PixelBackbone`: uint8 (B, S, S, 3) in,
    normalised, TTA as extracted) -> the embedding (rounded to the cache's dtype) or the
    logits, as the head takes them."""

    def __init__(self, model: nn.Module, prep: Preprocessing, pin: dict, head_input: str):
        super().__init__()
        self.net, self.input = PixelBackbone(model, prep, bool(pin["tta"])), head_input
        self.half = pin["dtype"] == "float16"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        emb, logits = self.net(pixels)
        if self.input == "logits":
            return logits
        return emb.half().float() if self.half else emb  # as the cache stored it


class FusedModel(nn.Module):
    """Every backbone's branch, their outputs side by side in the head's order, the head."""

    def __init__(self, branches: list[_Branch], head: nn.Module):
        super().__init__()
        self.branches, self.head = nn.ModuleList(branches), head

    def features(self, *pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(p) for b, p in zip(self.branches, pixels, strict=True)], dim=1)

    def forward(self, *pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(*pixels))


def export(
    head_dir: Path,
    models_dir: Path,
    out: Path,
    *,
    max_pixels: int,
    review_below: float | None = None,
    seed: int = 0,
) -> dict:
    """Write ``out``/model.onnx, model.json and the runtime (`pipeline.deploy`'s files) for
    the head in ``head_dir`` and the checkpoints in ``models_dir`` it pins (CheckpointError
    for any other). The graph's probabilities must match torch's (the backbones in eager
    mode, the head's own `predict_proba`) within TOLERANCE on random images drawn with
    ``seed``, else nothing is written. ``max_pixels`` (prepare.max_pixels) is recorded for
    the runtime's decoder, ``review_below`` (review.below) for its `review` column. Returns
    model.json's content."""
    head, sidecar = load_head(head_dir)
    backbones = list(sidecar["backbones"])
    branches, inputs, shas = [], [], {}
    for backbone in backbones:
        directory, pinned = pinned_checkpoint(backbone, sidecar, head_dir, models_dir)
        model, record = load_pinned(directory, pinned, "export")
        prep = record.preprocessing
        branches.append(_Branch(model, prep, sidecar["extraction"][backbone], head.input))
        inputs.append({"name": backbone, "preprocessing": json.loads(prep.to_json())})
        shas[backbone] = record.weights_sha256
    fused = FusedModel(branches, head.torch_module()).eval()
    sizes = [i["preprocessing"]["input_size"] for i in inputs]
    with atomic_dir(out) as tmp:
        write_onnx(fused, tuple(_images(sizes, 2, 0)), backbones, [OUTPUT], str(tmp / GRAPH))
        _check(fused, head, tmp / GRAPH, backbones, sizes, seed)
        record = {
            "format": FORMAT,
            "graph": GRAPH,
            "output": OUTPUT,
            "classes": list(sidecar["class_names"]),
            "inputs": inputs,  # (B, S, S, 3) uint8, S = preprocessing.input_size
            "max_pixels": max_pixels,
            "review_below": review_below,  # null: the runtime writes no `review` column
            "head": head.name,
            "extraction": sidecar["extraction"],  # each backbone's checkpoint, dtype and TTA
            "built_from": {
                "checkpoints": shas,
                "head": {f: file_sha256(head_dir / f) for f in (SIDECAR_FILE, HEAD_FILE)},
            },
            "versions": {name: _version(name) for name in _LIBRARIES},
        }
        _carry(tmp / GRAPH, record)
        record["graph_sha256"] = file_sha256(tmp / GRAPH)  # of the graph with its record
        write_json(tmp / RECORD, record)
        for name in RUNTIME:  # the runtime that reads this format travels with it
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_SOURCE / name, tmp / name)
    return record


def _carry(graph: Path, record: dict) -> None:
    """Store ``record`` in the graph's metadata, where the runtime compares model.json with it."""
    import onnx

    model = onnx.load(graph)
    onnx.helper.set_model_props(model, {CARRIED: json.dumps(record, sort_keys=True)})
    onnx.save(model, graph)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _images(sizes: list[int], n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8, generator=gen) for s in sizes]


@torch.no_grad()
def _check(fused, head, graph: Path, names: list[str], sizes: list[int], seed: int) -> None:
    """Refuse a graph whose probabilities differ from torch's by more than TOLERANCE, on a
    batch size other than the traced one (so the batch axis is checked to be free too)."""
    import onnxruntime as ort

    images = _images(sizes, 3, seed + 1)
    expected = head.predict_proba(fused.features(*images).numpy())
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {n: x.numpy() for n, x in zip(names, images, strict=True)})[0]
    diff = float(np.abs(got - expected).max())
    if not diff <= TOLERANCE:
        raise CheckpointError(
            f"{graph}: onnxruntime's probabilities differ from torch's by {diff:.3g} "
            f"(> {TOLERANCE}); the export is refused."
        )
