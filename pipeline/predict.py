"""Classify new images with the fused model: every fine-tuned backbone embeds them, the
fusion head decides. Unreadable images are reported per file; the rest are still classified."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline import layout
from pipeline.backbones import embed
from pipeline.checkpoint import backbone_info_of, load_checkpoint
from pipeline.data import load_image
from pipeline.errors import CheckpointError, DataError
from pipeline.heads import load_head
from pipeline.runtime import autocast, prepare_model, resolve_device
from pipeline.transforms import ImageDataset, eval_transform, model_input


@dataclass(frozen=True)
class Predictions:
    paths: list[Path]  # images classified, in input order
    proba: np.ndarray  # (n_images, n_classes)
    class_names: list[str]
    failures: list[tuple[Path, str]]  # (path, reason) of images that could not be read

    def rows(self) -> list[dict]:
        """One dict per image: path, predicted class, one probability column per class."""
        return [
            {"path": str(p), "predicted": self.class_names[int(np.argmax(pr))]}
            | {f"p_{c}": round(float(v), 6) for c, v in zip(self.class_names, pr, strict=True)}
            for p, pr in zip(self.paths, self.proba, strict=True)
        ]


def find_images(inputs: list[Path]) -> list[Path]:
    """Files as given, and every non-hidden file under given folders, sorted."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
        elif item.exists():
            found.append(item)
        else:
            raise DataError(f"{item}: no such file or folder.")
    return found


def predict(
    inputs: list[Path],
    head_dir: Path,
    models_dir: Path = layout.MODELS,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = True,
) -> Predictions:
    """Class probabilities of every readable image under ``inputs``."""
    head, sidecar = load_head(head_dir)
    paths, failures = [], []
    for path in find_images(inputs):
        try:
            load_image(path, size=64)  # a cheap full decode: catches truncated and non-image files
            paths.append(path)
        except DataError as exc:
            failures.append((path, str(exc)))
    if not paths:
        return Predictions(
            [], np.zeros((0, len(sidecar["class_names"]))), sidecar["class_names"], failures
        )

    run_on = resolve_device(device)
    blocks = []
    for backbone in sidecar["backbones"]:
        model, ckpt = load_checkpoint(layout.checkpoint_dir(backbone, models_dir))
        if ckpt["class_names"] != sidecar["class_names"]:
            raise CheckpointError(
                f"Checkpoint of {backbone} predicts {ckpt['class_names']} but head {head_dir} "
                f"predicts {sidecar['class_names']}; they come from different manifests."
            )
        info = backbone_info_of(ckpt)
        model = prepare_model(model, run_on)
        loader = DataLoader(
            ImageDataset(paths, None, eval_transform(info), info.input_size), batch_size=batch_size
        )
        out = []
        with torch.inference_mode():
            for images, _, _ in tqdm(
                loader, desc=f"embed {backbone}", unit="batch", disable=not progress
            ):
                with autocast(run_on):
                    emb, logits = embed(model, model_input(images, info, run_on))
                out.append((emb if head.input == "embeddings" else logits).float().cpu().numpy())
        blocks.append(np.concatenate(out))
    return Predictions(
        paths, head.predict_proba(np.concatenate(blocks, axis=1)), sidecar["class_names"], failures
    )
