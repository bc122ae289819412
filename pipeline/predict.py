"""Classify new images with the fused model: every fine-tuned backbone embeds them through
the extraction code the caches came from, the fusion head decides. An image whose bytes are
in a backbone's image cache (by sha256, for the checkpoint's squares) is read from there.
Unreadable images are reported per file; the rest are still classified."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from pipeline import layout
from pipeline.config import ExtractParams
from pipeline.data.images import load_image
from pipeline.engine import engine_for
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.extract import embed_images
from pipeline.fusion.heads import by_input, check_head_fits, load_head
from pipeline.models.checkpoint import SIDECAR, CheckpointRecord, load_checkpoint, read_record
from pipeline.models.preprocessing import Preprocessing
from pipeline.predictions import Predictions, find_images
from pipeline.runtime import resolve_device
from pipeline.storage.feature_cache import FEATURES
from pipeline.storage.hashing import file_sha256
from pipeline.storage.image_cache import usable_image_cache


def predict(
    inputs: list[Path],
    head_dir: Path,
    params: ExtractParams,
    models_dir: Path = layout.MODELS,
    progress: bool = True,
    images_dir: Path = layout.IMAGES,
    *,
    max_pixels: int,
    review_below: float | None = None,
) -> Predictions:
    """Class probabilities of every readable image under ``inputs``.

    Each backbone embeds the images as `extract` does (`embed_images` with ``params``, the
    `extract` section); the checkpoints and the `extract` params that shape features must be
    those the head's caches were made with, checked before any image is read. A backbone's
    image cache in ``images_dir`` made for its checkpoint's squares serves the files whose
    sha256 it holds; the others are decoded, refused over ``max_pixels`` (prepare.max_pixels).
    Images whose top probability is below ``review_below`` (review.below) are flagged for
    review. DataError when ``inputs`` hold no file, or no readable image.
    """
    head, sidecar = load_head(head_dir)
    device = resolve_device(params.device)
    checkpoints = [
        _pinned(b, sidecar, head_dir, models_dir, params, device) for b in sidecar["backbones"]
    ]
    found = find_images(inputs)
    if not found:
        raise DataError(f"No files under {', '.join(map(str, inputs))}: nothing to classify.")
    records = [record for _, record, _ in checkpoints]
    check_head_fits(
        sidecar,
        class_names=list(records[0].class_names),
        backbones=[r.backbone for r in records],
        where=head_dir,
    )
    caches = [
        usable_image_cache(layout.image_cache(r.backbone, images_dir), r.preprocessing)
        for r in records
    ]
    ids, paths, failures = _readable(inputs, found, caches, max_pixels)
    blocks = []
    for (directory, pinned, engine), cache in zip(checkpoints, caches, strict=True):
        model, record = load_pinned(directory, pinned, "predict")
        squares = cache.squares([ids[p] for p in paths]) if cache else None
        run = replace(params, engine=engine)
        emb, logits = _embedded(model, record, paths, run, device, progress, squares, max_pixels)
        blocks.append(by_input(head, embeddings=emb.astype(np.float32), logits=logits))
    proba = head.predict_proba(np.concatenate(blocks, axis=1))
    return Predictions(paths, proba, sidecar["class_names"], failures, review_below)


def _readable(
    inputs: list[Path], found: list[Path], caches: list, max_pixels: int
) -> tuple[dict, list, list]:
    """The sha256 of each file (only when an image cache may hold it), the readable files and
    ``(path, reason)`` of the others; DataError when none is readable. A file an image cache
    holds was decoded once already; the others are decoded once, cheaply, to catch truncated
    and non-image files."""
    ids = {path: file_sha256(path) for path in found} if any(caches) else {}
    held = set()  # sha256 of files an image cache holds
    for cache in filter(None, caches):
        held.update(cache.sample_id.astype(str).tolist())
    paths, failures = [], []
    for path in found:
        try:
            if ids.get(path) not in held:
                load_image(path, max_pixels=max_pixels, size=64)
            paths.append(path)
        except DataError as exc:
            failures.append((path, str(exc)))
    if not paths:
        raise DataError(
            f"None of the {len(found)} file(s) under {', '.join(map(str, inputs))} is a readable "
            f"image, e.g. {failures[0][1]}"
        )
    return ids, paths, failures


def _embedded(model, record, paths, params, device, progress, squares, max_pixels):
    """Embeddings (n, D) and logits (n, n_classes) of ``paths``, as `extract` makes them."""
    batches = list(
        embed_images(
            model, record.info, paths, params, device, progress, squares, max_pixels=max_pixels
        )
    )
    return (np.concatenate([b[i] for b in batches]) for i in (1, 2))


def _pinned(
    backbone: str,
    sidecar: dict,
    head_dir: Path,
    models_dir: Path,
    params: ExtractParams,
    device,
) -> tuple[Path, CheckpointRecord, str]:
    """`pinned_checkpoint` and the engine to run it by on ``device`` (`engine_for`: "auto"
    is the one its cache was made by); ConfigError unless ``params`` extract as that cache
    was extracted."""
    directory, record = pinned_checkpoint(backbone, sidecar, head_dir, models_dir)
    pinned = FEATURES.defaults | sidecar["extraction"][backbone]  # pinned before a key: its default
    given = {
        "dtype": params.dtype,
        "tta": params.tta,
        "engine": engine_for(params.engine, device, pinned["engine"]),
    }
    for key, value in given.items():
        if pinned[key] != value:
            raise ConfigError(
                f"Head {head_dir} was trained on {backbone} features extracted with "
                f"extract.{key}={pinned[key]!r}, but the params give {value!r}; "
                f"set it back, or re-run `dvc repro` with the new value."
            )
    return directory, record, given["engine"]


def load_pinned(directory: Path, pinned: CheckpointRecord, command: str):
    """The model in ``directory`` (its weights' sha256 verified) and its record, which must
    still be the ``pinned`` one `pinned_checkpoint` checked: CheckpointError if replaced since."""
    model, record = load_checkpoint(directory)
    if record != pinned:
        raise CheckpointError(f"{directory / SIDECAR} changed while {command} was running.")
    return model, record


def pinned_checkpoint(
    backbone: str, sidecar: dict, head_dir: Path, models_dir: Path
) -> tuple[Path, CheckpointRecord]:
    """The checkpoint folder of ``backbone`` in ``models_dir`` and its record: CheckpointError
    unless it is the checkpoint whose cache the head (``sidecar``, in ``head_dir``) was
    trained on: weights sha256 and whole preprocessing record."""
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
