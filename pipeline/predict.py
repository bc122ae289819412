"""Classify new images with the fused model: every fine-tuned backbone embeds them through
the extraction code the caches came from, the fusion head decides. An image whose bytes are
in a backbone's image cache (by sha256, for the checkpoint's squares) is read from there.
Unreadable images are reported per file; the rest are still classified."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import layout
from pipeline.config import ExtractParams
from pipeline.data.manifest import load_image
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.extract import embed_images
from pipeline.fusion.heads import load_head
from pipeline.models.checkpoint import SIDECAR, CheckpointRecord, load_checkpoint, read_record
from pipeline.models.preprocessing import Preprocessing
from pipeline.runtime import resolve_device
from pipeline.storage.atomic import write_text
from pipeline.storage.feature_cache import file_sha256
from pipeline.storage.image_cache import usable_image_cache


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
    params: ExtractParams,
    models_dir: Path = layout.MODELS,
    progress: bool = True,
    images_dir: Path = layout.IMAGES,
) -> Predictions:
    """Class probabilities of every readable image under ``inputs``.

    Each backbone embeds the images as `extract` does (`embed_images` with ``params``, the
    `extract` section); the checkpoints and the `extract` params that shape features must be
    those the head's caches were made with, checked before any image is read. A backbone's
    image cache in ``images_dir`` made for its checkpoint's squares serves the files whose
    sha256 it holds; the others are decoded. DataError when ``inputs`` hold no file, or no
    readable image.
    """
    head, sidecar = load_head(head_dir)
    checkpoints = [_pinned(b, sidecar, head_dir, models_dir, params) for b in sidecar["backbones"]]
    found = find_images(inputs)
    if not found:
        raise DataError(f"No files under {', '.join(map(str, inputs))}: nothing to classify.")
    infos = [record.info for _, record in checkpoints]
    caches = [
        usable_image_cache(layout.image_cache(b, images_dir), info)
        for b, info in zip(sidecar["backbones"], infos, strict=True)
    ]
    ids = {path: file_sha256(path) for path in found} if any(caches) else {}
    held = set()  # sha256 of files an image cache holds: decoded once already, fine then
    for cache in filter(None, caches):
        held.update(cache.sample_id.astype(str).tolist())
    paths, failures = [], []
    for path in found:
        try:
            if ids.get(path) not in held:
                load_image(path, size=64)  # a cheap full decode: catches truncated, non-image files
            paths.append(path)
        except DataError as exc:
            failures.append((path, str(exc)))
    if not paths:
        raise DataError(
            f"None of the {len(found)} file(s) under {', '.join(map(str, inputs))} is a readable "
            f"image, e.g. {failures[0][1]}"
        )

    device = resolve_device(params.device)
    blocks = []
    for (directory, pinned), info, cache in zip(checkpoints, infos, caches, strict=True):
        model, record = load_checkpoint(directory)
        if record != pinned:  # replaced since it was checked
            raise CheckpointError(f"{directory / SIDECAR} changed while predict was running.")
        squares = cache.squares([ids[p] for p in paths]) if cache else None
        batches = list(embed_images(model, info, paths, params, device, progress, squares))
        emb, logits = (np.concatenate([b[i] for b in batches]) for i in (1, 2))
        blocks.append(emb.astype(np.float32) if head.input == "embeddings" else logits)
    return Predictions(
        paths, head.predict_proba(np.concatenate(blocks, axis=1)), sidecar["class_names"], failures
    )


def _pinned(
    backbone: str, sidecar: dict, head_dir: Path, models_dir: Path, params: ExtractParams
) -> tuple[Path, CheckpointRecord]:
    """The checkpoint folder of ``backbone`` in ``models_dir`` and its record: CheckpointError
    unless it is the checkpoint whose cache the head was trained on (weights sha256 and whole
    preprocessing record), ConfigError unless ``params`` extract as that cache was extracted."""
    pinned = (sidecar.get("extraction") or {}).get(backbone)
    if pinned is None or "preprocessing" not in pinned:
        raise CheckpointError(
            f"Head {head_dir} does not record the checkpoints its caches came from and their "
            f"preprocessing (an older defuse made it); re-run `defuse fuse {sidecar['head']}` "
            "(or `dvc repro`)."
        )
    directory = layout.checkpoint_dir(backbone, models_dir)
    record = read_record(directory)
    if record.weights_sha256 != pinned["checkpoint_sha256"]:
        raise CheckpointError(
            f"Head {head_dir} was trained on features of {backbone} checkpoint "
            f"{pinned['checkpoint_sha256']}, but {directory} is checkpoint "
            f"{record.weights_sha256}. Re-run `defuse extract {backbone}` and `defuse fuse "
            f"{sidecar['head']}` (or `dvc repro`), or restore that checkpoint."
        )
    _check_preprocessing(record, pinned, directory / SIDECAR, head_dir)
    for key in ("dtype", "tta"):
        if pinned[key] != getattr(params, key):
            raise ConfigError(
                f"Head {head_dir} was trained on {backbone} features extracted with "
                f"extract.{key}={pinned[key]!r}, but the params give {getattr(params, key)!r}; "
                f"set it back, or re-run `dvc repro` with the new value."
            )
    return directory, record


def _check_preprocessing(
    record: CheckpointRecord, pin: dict, sidecar: Path, head_dir: Path
) -> None:
    """Refuse a checkpoint whose preprocessing record is not the one the head's cache was
    extracted with: model.json is not covered by the weights' sha256, and an edited
    input_size or mean would silently change every answer."""
    pinned = Preprocessing.from_json(pin["preprocessing"], f"head {head_dir}: preprocessing")
    if record.preprocessing != pinned:
        now, then = asdict(record.preprocessing), asdict(pinned)
        differ = ", ".join(f"{k} {now[k]!r} (pinned {then[k]!r})" for k in now if now[k] != then[k])
        raise CheckpointError(
            f"{sidecar}: preprocessing differs from the one head {head_dir} pinned: {differ}; "
            "restore the checkpoint's model.json, or re-run `dvc repro`."
        )


def check_output(out: Path) -> None:
    """Refuse an ``out`` that `write_predictions` cannot write, before any image is read."""
    if out.is_dir():
        raise DataError(f"--out {out}: a folder, not a file; name a file ending in .csv or .json.")
    if out.suffix not in (".csv", ".json"):
        raise DataError(
            f"--out {out}: unknown format {out.suffix or '(no suffix)'!r}; use .csv or .json."
        )


def write_predictions(predictions: Predictions, out: Path) -> Path:
    """``out`` (.csv or .json, see `check_output`) with one row per classified image."""
    check_output(out)
    rows = predictions.rows()
    if out.suffix == ".json":
        return write_text(out, json.dumps(rows, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(out, buf.getvalue())
