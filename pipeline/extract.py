"""Stage one's product: every manifest image's penultimate embedding and logits, streamed
into an HDF5 feature cache. Rows of unchanged samples are reused from the previous cache;
under torchrun the new rows are shared out by whole batches and merged by rank 0.
`embed_images` is the one way images become features: `defuse predict` uses it too."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline import distributed, layout
from pipeline.config import ExtractParams
from pipeline.data.manifest import Manifest
from pipeline.data.transforms import ImageDataset, eval_transform, model_input
from pipeline.engine import OnnxBackbone, engine_for, tta_embed
from pipeline.errors import CacheError, CheckpointError, ConfigError
from pipeline.models.checkpoint import CheckpointRecord, load_checkpoint
from pipeline.models.registry import BackboneInfo
from pipeline.progress import tracked
from pipeline.runtime import autocast, library_versions, prepare_model, resolve_device
from pipeline.storage.atomic import atomic_file
from pipeline.storage.feature_cache import CacheWriter, FeatureCache, cache_attrs, reusable_cache
from pipeline.storage.image_cache import Squares, open_image_cache
from pipeline.storage.rowstore import RowsWritten

log = logging.getLogger(__name__)


def extract(
    manifest: Manifest,
    checkpoint_dir: Path,
    out: Path,
    params: ExtractParams,
    progress: bool = True,
    images: Path | None = None,
) -> RowsWritten:
    """Write ``out`` for every manifest row, in manifest order, running only new samples.

    ``images``: the image cache (`defuse decode`) holding the checkpoint's squares of every
    manifest image, read instead of decoding the files (same pixels); None decodes them.

    Under torchrun each process runs whole batches of the new samples (rank r: batches r,
    r + N, ... of the single-process order) and rank 0 writes the cache from all of them, so
    the file is byte-identical to a plain run's.
    """
    model, record = load_checkpoint(checkpoint_dir)
    _check_lineage(checkpoint_dir, record, manifest)
    info = record.info
    cache = open_image_cache(images, info.preprocessing, info.name) if images is not None else None
    fold_of, fold_models = _cross_fit(checkpoint_dir, record, manifest)
    device = resolve_device(params.device)
    params = replace(params, engine=engine_for(params.engine, device))  # the cache records it
    attrs = _attrs(record, manifest, params, fold_models)
    old, old_row = _previous(out, attrs, manifest)
    new_rows = np.flatnonzero(old_row < 0)
    log.info("%s: %d rows reused, %d to compute", out, len(manifest) - len(new_rows), len(new_rows))
    with distributed.process_group(device) as here:
        _clear_shards(here, checkpoint_dir, out, len(fold_models))
        progress = progress and here.is_main
        models = [(-1, model), *((k, m) for k, (m, _) in enumerate(fold_models))]
        groups = []  # each model runs the new rows it embeds (the full model: this rank's share)
        for k, net in models:
            rows = _rows_of(k, new_rows, fold_of, params.batch_size, here)
            if len(rows):
                batches = _embed_rows(net, info, manifest, rows, params, device, cache, progress)
                groups.append(_at_rows(rows, batches))
        with _merged(itertools.chain(*groups), out, new_rows, params.batch_size) as computed:
            if here.is_main:
                batches = itertools.chain(_reused(old, old_row), computed)
                _write_cache(out, manifest, info.dim, attrs, batches, fold_of)
    return RowsWritten(out, len(manifest), len(manifest) - len(new_rows), len(new_rows))


def _attrs(
    record: CheckpointRecord, manifest: Manifest, params: ExtractParams, fold_models: list
) -> dict:
    """The new cache's attributes (`cache_attrs`): what made its rows."""
    return cache_attrs(
        record.backbone,
        manifest.class_names,
        record.preprocessing,
        record.weights_sha256,
        manifest.sha256,
        dtype=params.dtype,
        tta=params.tta,
        engine=params.engine,
        versions=library_versions(*(("onnxruntime",) if params.engine == "onnxruntime" else ())),
        cross_fit=len(fold_models),  # 0, or K: train rows come from the fold models
        fold_checkpoint_sha256=" ".join(fold.weights_sha256 for _, fold in fold_models),
    )


def _previous(out: Path, attrs: dict, manifest: Manifest) -> tuple[FeatureCache | None, np.ndarray]:
    """The cache at ``out`` if its rows can be reused for ``attrs``, and the row in it of each
    manifest sample ((N,) int64, -1 where the row must be computed)."""
    old = reusable_cache(out, attrs)
    if old is None:
        return None, np.full(len(manifest), -1)
    return old, old.rows_for(manifest.sample_id)


def _clear_shards(here, checkpoint_dir: Path, out: Path, folds: int) -> None:
    """Refuse torchrun for a cross-fitted checkpoint; rank 0 removes the shards (and their
    temporary files) a killed torchrun left, and the others wait before writing theirs."""
    if folds and here.size > 1:
        raise ConfigError(
            f"{checkpoint_dir} is cross-fitted (finetune.cross_fit={folds}): "
            "extract it in one process, without torchrun."
        )
    if here.is_main:
        for stale in out.parent.glob(f"*.{out.name}.shard-*"):
            stale.unlink()
    distributed.barrier()


def _rows_of(k: int, new_rows: np.ndarray, fold_of: np.ndarray, batch_size: int, here):
    """The new manifest rows model ``k`` embeds here: fold model k's own; the full model's
    (k = -1) shared out between the processes by whole batches."""
    rows = new_rows[fold_of[new_rows] == k]
    if k < 0:
        rows = rows[distributed.batch_shard(len(rows), batch_size, here.rank, here.size)]
    return rows


def _embed_rows(net, info, manifest, rows, params, device, cache, progress) -> Iterator[tuple]:
    """`embed_images` over the manifest ``rows``, from the image cache when there is one."""
    paths = [manifest.image_path(int(r)) for r in rows]
    squares = cache.manifest_squares(manifest, rows) if cache else None
    return embed_images(
        net, info, paths, params, device, progress, squares, max_pixels=manifest.max_pixels
    )


def _reused(old: FeatureCache | None, old_row: np.ndarray) -> Iterator[tuple]:
    """``(manifest rows, embeddings, logits)`` taken from the previous cache, in chunks."""
    kept = np.flatnonzero(old_row >= 0)
    for chunk in np.array_split(kept, max(1, len(kept) // 4096)) if len(kept) else ():
        yield chunk, old.embeddings[old_row[chunk]], old.logits[old_row[chunk]]


def _check_lineage(directory: Path, record: CheckpointRecord, manifest: Manifest) -> None:
    """Refuse a checkpoint (or fold model) fine-tuned on another manifest: its val and test
    rows may be images it trained on."""
    if record.manifest_sha256 != manifest.sha256:
        raise CheckpointError(
            f"Checkpoint {directory} was fine-tuned on manifest "
            f"{record.manifest_sha256}, but {manifest.path} is manifest {manifest.sha256}: "
            "its val and test images may be ones it trained on. Re-run "
            f"`defuse finetune {record.backbone}` on this manifest (or `dvc repro`)."
        )


def _cross_fit(
    checkpoint_dir: Path, record: CheckpointRecord, manifest: Manifest
) -> tuple[np.ndarray, list]:
    """For a cross-fitted checkpoint: the fold model of each manifest row ((N,) int8, -1 for
    the model trained on all of train) and the fold models with their records; a plain
    checkpoint gives all -1 and none. Every train row must be held out by exactly one fold."""
    k = record.cross_fit
    fold_of, folds = np.full(len(manifest), -1, np.int8), []
    index = {sid: i for i, sid in enumerate(manifest.sample_id)}
    for j in range(k):
        model, fold = load_checkpoint(layout.fold_dir(checkpoint_dir, j))
        _check_lineage(layout.fold_dir(checkpoint_dir, j), fold, manifest)  # so its ids are here
        fold_of[[index[sid] for sid in fold.held_out or ()]] = j
        folds.append((model, fold))
    train = manifest.indices("train")
    if k and (fold_of[train] < 0).any():
        raise CacheError(
            f"{checkpoint_dir}: {(fold_of[train] < 0).sum()} train rows are held out by none of "
            f"its {k} fold models; re-run `defuse finetune {record.backbone}`."
        )
    return fold_of, folds


def _write_cache(
    out: Path, manifest: Manifest, dim: int, attrs: dict, batches: Iterable, fold_of: np.ndarray
) -> None:
    """Stream ``batches`` of ``(sorted manifest rows, embeddings, logits)`` into the cache;
    ``fold_of``: (N,) the fold model of each manifest row."""
    with CacheWriter(out, len(manifest), dim, attrs) as writer:
        for rows, emb, logits in batches:
            # write each run of consecutive rows as one slice
            for run in np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1):
                a, b = int(rows[run[0]]), int(rows[run[-1]]) + 1
                writer.write(
                    a,
                    emb[run],
                    logits[run],
                    manifest.sample_id[a:b],
                    manifest.label[a:b],
                    manifest.split[a:b],
                    fold_of[a:b],
                )


def embed_images(
    model: torch.nn.Module,
    info: BackboneInfo,
    paths: Sequence[Path],
    params: ExtractParams,
    device: torch.device,
    progress: bool = True,
    squares: Squares | None = None,
    *,
    max_pixels: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """What a feature cache holds for each image of ``paths``: per batch of
    ``params.batch_size``, ``(positions in paths (b,), embeddings (b, D) rounded to
    params.dtype, logits (b, n_classes) float32)``.

    The checkpoint's eval preprocessing (``info``: resize, no crop), ``params.tta`` (mean over
    flips), run by ``params.engine`` (`engine_for` ``device``: bf16 autocast on CUDA;
    onnxruntime on the CPU only, ConfigError at once otherwise); ``params.num_workers``
    loader processes. ``squares``: the image cache's rows of ``paths``, read instead of
    decoding the files they hold; ``max_pixels``: prepare.max_pixels, the bound for those
    decoded.
    """
    params = replace(params, engine=engine_for(params.engine, device))
    prep = info.preprocessing
    loader = DataLoader(
        ImageDataset(
            paths, None, eval_transform(prep), prep.input_size, squares, max_pixels=max_pixels
        ),
        batch_size=params.batch_size,
        num_workers=params.num_workers,
        pin_memory=device.type == "cuda",
    )
    return _batches(model, info, loader, params, device, progress)


@torch.inference_mode()
def _batches(model, info: BackboneInfo, loader, params: ExtractParams, device, progress):
    """`embed_images`' batches; the engine is made ready when the first one is asked for."""
    forward = _forward(model, info, params, device)
    for images, _, index in tracked(loader, f"embed {info.name}", "batch", enabled=progress):
        emb, logits = forward(images)
        with np.errstate(over="ignore"):  # float16 overflow: the cache writer refuses the inf
            emb = emb.astype(params.dtype, copy=False)
        yield index.numpy(), emb, logits


def _forward(model, info: BackboneInfo, params: ExtractParams, device: torch.device):
    """A loader batch (B, 3, S, S) uint8 -> embeddings (B, D) and logits (B, C), float32
    numpy, by ``params.engine``."""
    prep = info.preprocessing
    if params.engine == "onnxruntime":
        engine = OnnxBackbone(model, prep, params.tta, info.name)
        return lambda images: engine(np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy()))
    model = prepare_model(model, device).eval()

    def forward(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with autocast(device):
            emb, logits = tta_embed(model, model_input(images, prep, device), params.tta)
        return emb.float().cpu().numpy(), logits.float().cpu().numpy()

    return forward


def _at_rows(rows: np.ndarray, batches: Iterator[tuple]) -> Iterator[tuple]:
    """``batches`` of `embed_images` over the manifest ``rows``, indexed by manifest row."""
    for index, emb, logits in batches:
        yield rows[index], emb, logits


def _shard(out: Path, rank: int) -> Path:
    return out.with_name(f".{out.name}.shard-{rank}")


@contextlib.contextmanager
def _merged(batches: Iterator[tuple], out: Path, new_rows: np.ndarray, batch_size: int):
    """Every process's computed ``batches`` in the single-process order, for rank 0 to write.

    A plain run streams its batches straight through. Under torchrun each process first
    writes its own to a hidden shard beside ``out`` (one HDF5 group per batch), and rank 0
    reads them back once all are complete; so on several nodes ``out`` must be on a
    filesystem every node shares. A failure in any process stops all of them with an error
    rather than a wait, and the shards are removed whatever happens.
    """
    here = distributed.world()
    if here.size == 1:
        yield batches
        return
    try:
        error = None
        try:
            with atomic_file(_shard(out, here.rank)) as tmp, h5py.File(tmp, "w") as f:
                for k, (_, emb, logits) in enumerate(batches):
                    f[f"{k}/embeddings"], f[f"{k}/logits"] = emb, logits
        except Exception as exc:  # tell the others before raising, so that none waits for us
            error = exc
        failed = distributed.failed_ranks(error is not None)
        if error is not None:
            raise error
        if failed:
            raise CacheError(f"{out}: not written; rank(s) {failed} failed (see their error).")
        yield _read_shards(out, new_rows, batch_size, here.size) if here.is_main else iter(())
        distributed.barrier()  # the others end once rank 0 has written the cache
    finally:
        for rank in range(here.size) if here.is_main else [here.rank]:
            _shard(out, rank).unlink(missing_ok=True)


def _read_shards(out: Path, new_rows: np.ndarray, batch_size: int, size: int) -> Iterator[tuple]:
    """Batch j of ``new_rows`` in the single-process order is batch j // size of rank
    j % size: yield them in order as ``(manifest rows, embeddings, logits)``."""
    with contextlib.ExitStack() as stack:
        shards = []
        for rank in range(size):
            path = _shard(out, rank)
            if not path.is_file():
                raise CacheError(
                    f"{path}: the shard of rank {rank} is missing; on several nodes the output "
                    "folder must be on a filesystem that every node shares."
                )
            shards.append(stack.enter_context(h5py.File(path, "r")))
        for j, start in enumerate(range(0, len(new_rows), batch_size)):
            batch = shards[j % size][str(j // size)]
            yield new_rows[start : start + batch_size], batch["embeddings"][()], batch["logits"][()]
