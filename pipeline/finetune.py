"""Transfer learning of one backbone on the manifest, as the fusion paper does it.

New n-class layer behind dropout, leading stages frozen, online augmentation, RMSprop (or
SGD) with the learning rate decaying from ``lr`` to ``lr_final``, the best epoch chosen on
the validation split. The test split is only scored, once, with the chosen weights.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from pipeline import distributed
from pipeline.config import FinetuneParams, asdict
from pipeline.data.manifest import Manifest
from pipeline.data.transforms import ImageDataset, eval_transform, target_info, train_transform
from pipeline.errors import ConfigError, DataError
from pipeline.metrics import classification_metrics, write_json
from pipeline.models.checkpoint import CheckpointRecord, save_checkpoint
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.registry import BackboneInfo, create_backbone, freeze_stages
from pipeline.optim import class_weights
from pipeline.plotting import plot_history
from pipeline.progress import note
from pipeline.runtime import library_versions, prepare_model, resolve_device
from pipeline.storage.atomic import write_text
from pipeline.storage.image_cache import ImageCache, open_image_cache
from pipeline.training import (
    BestEpoch,
    TrainingRun,
    check_finite,
    check_weights,
    make_loader,
    make_optimizer,
    predict_logits,
    train_epoch,
)

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "train_s")


@dataclass(frozen=True)
class FinetuneResult:
    record: CheckpointRecord  # as save_checkpoint wrote it; on ranks > 0 weights_sha256 is ""
    history: list[dict]  # one row per epoch, HISTORY_FIELDS
    val_metrics: dict
    test_metrics: dict | None  # None when the manifest has no test rows


def _rank_batch(batch_size: int, n_processes: int) -> int:
    """Each process's share of the global batch ``finetune.batch_size``."""
    if batch_size % n_processes:
        raise ConfigError(
            f"finetune.batch_size={batch_size} is the global batch and must divide evenly "
            f"among the {n_processes} processes torchrun started (world size {n_processes}); "
            f"use a multiple of {n_processes}."
        )
    return batch_size // n_processes


def _epoch_line(backbone: str, epochs: int, row: dict, seconds: float) -> str:
    """One epoch's figures for the log, e.g. "finetune lite0 epoch 2/3: train loss 0.61 ..."."""
    return (
        f"finetune {backbone} epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.3f} "
        f"acc {row['train_acc']:.3f}, val loss {row['val_loss']:.3f} acc {row['val_acc']:.3f}, "
        f"{seconds:.0f} s"
    )


def cross_fit_folds(manifest: Manifest, k: int, seed: int) -> list[np.ndarray]:
    """The manifest rows each of ``k`` fold models leaves out: the train rows in k
    stratified, seeded folds (every train row in exactly one); none for ``k`` = 0 (off)."""
    if k == 0:
        return []
    train = manifest.indices("train")
    labels = manifest.label[train]
    if np.bincount(labels).min(initial=k) < k:
        small = [manifest.class_names[c] for c in np.flatnonzero(np.bincount(labels) < k)]
        raise ConfigError(
            f"finetune.cross_fit={k} needs at least {k} train images per class; "
            f"{small} have fewer. Use a smaller cross_fit, or 0."
        )
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [train[held] for _, held in folds.split(np.zeros((len(train), 1)), labels)]


def finetune(
    manifest: Manifest,
    backbone: str,
    params: FinetuneParams,
    out_dir: Path,
    progress: bool = True,
    held_out: np.ndarray | None = None,
    images: Path | None = None,
) -> FinetuneResult:
    """Fine-tune ``backbone`` on the manifest's train split; write the checkpoint to ``out_dir``.

    ``held_out``: train rows this model must not see (a cross-fitting fold model); they are
    listed by sample id in its sidecar, and the test split is not scored.
    ``images``: the image cache (`defuse decode`) holding this backbone's squares of every
    manifest image, read instead of decoding the files each epoch (same pixels, same
    result); None decodes the files.

    Under torchrun every process runs this: DDP over the train rows with ``batch_size`` as the
    global batch, the eval rows shared out and gathered so that every process picks the same
    epoch, and rank 0 alone writes the checkpoint (the others return once it is written).
    """
    rows = _split_rows(manifest, held_out)
    device = resolve_device(params.device)
    rank_batch = _rank_batch(params.batch_size, distributed.world().size)
    info = target_info(backbone, params)
    cache = open_image_cache(images, info.preprocessing, backbone) if images is not None else None
    source = _Images(manifest, info.preprocessing, cache)

    # A forked RNG keeps the seed local: head init, augmentation and dropout follow it.
    # Every step below keeps its place: each loader's iteration draws from that RNG.
    with distributed.process_group(device) as here, torch.random.fork_rng(devices=[]):
        progress = progress and here.is_main
        model, train_model = _build_model(backbone, len(manifest.class_names), params, device, here)
        run = _training(source, rows, model, train_model, params, rank_batch, device, here)
        # From the image cache an eval batch is a copy and a normalisation, so it runs in this
        # process: workers forked after the first epoch would share its grown, kept heap, and
        # every page it then writes would be a copy-on-write fault (README, page faults).
        evaluate = _Evaluator(
            model, source, params.eval_batch_size, 0 if cache else params.num_workers, device,
            here, progress,
        )  # fmt: skip
        history, best = _train_epochs(run, evaluate, rows.val, backbone, params, progress)
        model.load_state_dict(best.state)
        val_metrics, test_metrics = _score(manifest, rows, best, evaluate)
        record = _record(
            manifest, backbone, info, params, here.size, best.epoch, val_metrics, held_out
        )
        if here.is_main:
            record = save_checkpoint(model.cpu(), out_dir, record)
        distributed.barrier()
    return FinetuneResult(record, history, val_metrics, test_metrics)


def _record(
    manifest: Manifest,
    backbone: str,
    info: BackboneInfo,
    params: FinetuneParams,
    world_size: int,
    best_epoch: int,
    val_metrics: dict,
    held_out: np.ndarray | None,
) -> CheckpointRecord:
    """The checkpoint's sidecar record, before save_checkpoint adds the weights' sha256."""
    return CheckpointRecord(
        backbone=backbone,
        class_names=tuple(manifest.class_names),
        dim=info.dim,
        preprocessing=info.preprocessing,  # extract and predict read it from here only
        params=asdict(params),
        world_size=world_size,
        best_epoch=best_epoch,
        val_metrics={k: val_metrics[k] for k in ("accuracy", "f1_macro", "n")},
        manifest_sha256=manifest.sha256,
        held_out=None if held_out is None else tuple(manifest.sample_id[i] for i in held_out),
        versions=library_versions(),
    )


@dataclass(frozen=True)
class _Rows:
    """The manifest rows of each split one model uses."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray  # empty for a cross-fitting fold model


def _split_rows(manifest: Manifest, held_out: np.ndarray | None) -> _Rows:
    """The split rows, less ``held_out`` (which also drops the test split); a DataError when
    train or val is empty."""
    train, val, test = (manifest.indices(s) for s in ("train", "val", "test"))
    if held_out is not None:
        train, test = np.setdiff1d(train, held_out), test[:0]
    for split, idx in (("train", train), ("val", val)):
        if len(idx) == 0:
            raise DataError(
                f"{manifest.path}: the {split} split is empty; fine-tuning needs both train and val rows."
            )
    return _Rows(train, val, test)


@dataclass(frozen=True)
class _Images:
    """Where the images come from: the image cache's squares, or the files (cache None)."""

    manifest: Manifest
    preprocessing: Preprocessing
    cache: ImageCache | None

    def dataset(self, rows: np.ndarray, transform) -> ImageDataset:
        squares = self.cache.manifest_squares(self.manifest, rows) if self.cache else None
        return ImageDataset.from_manifest(
            self.manifest, rows, transform, self.preprocessing.input_size, squares
        )


def _build_model(
    backbone: str, n_classes: int, params: FinetuneParams, device, here: distributed.World
) -> tuple[nn.Module, nn.Module]:
    """The model (seeded head, frozen stages, on ``device``) and the one to train: under
    torchrun its DDP wrapper, else the model itself. Seeds this rank's RNG for training."""
    torch.manual_seed(params.seed)
    model = create_backbone(
        backbone,
        n_classes,
        pretrained=params.pretrained,
        weights=params.weights,
        drop_rate=params.dropout,
    )
    n_frozen = freeze_stages(model, params.frozen_stages)
    log.info(
        "%s: %d parameters frozen in %d leading stages",
        backbone,
        n_frozen,
        params.frozen_stages,
    )
    model = prepare_model(model, device)
    # DDP starts every process from rank 0's weights; augmentation and dropout draw per rank.
    torch.manual_seed(params.seed + here.rank)
    if here.size == 1:
        return model, model
    cuda = device.type == "cuda"
    return model, DistributedDataParallel(model, device_ids=[device.index] if cuda else None)


def _training(
    source: _Images,
    rows: _Rows,
    model: nn.Module,
    train_model: nn.Module,
    params: FinetuneParams,
    rank_batch: int,
    device,
    here: distributed.World,
) -> TrainingRun:
    """The train loader, loss and optimizer over the trainable parameters of ``model``."""
    prep = source.preprocessing
    train_set = source.dataset(rows.train, train_transform(prep, params))
    # One permutation per epoch whatever the world size; rank r takes every size-th sample
    # of it, so a step's global batch holds the same samples as a single process's batch.
    sampler = DistributedSampler(train_set, here.size, here.rank, shuffle=True, seed=params.seed)
    loader = make_loader(train_set, rank_batch, params.num_workers, device, sampler)
    n_classes = len(source.manifest.class_names)
    weight = (
        torch.tensor(
            class_weights(source.manifest.label[rows.train], n_classes), dtype=torch.float32
        )
        if params.class_weighted
        else None
    )
    criterion = nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None)
    optimizer = make_optimizer(params, [p for p in model.parameters() if p.requires_grad])
    total_steps = params.epochs * len(loader)
    return TrainingRun(
        train_model, loader, sampler, criterion, optimizer, prep, device, total_steps
    )


@dataclass(frozen=True)
class _Evaluator:
    """Logits of the (unwrapped) model on some manifest rows, shared out among processes."""

    model: nn.Module
    source: _Images
    batch_size: int
    workers: int
    device: torch.device
    here: distributed.World
    progress: bool

    def __call__(self, rows: np.ndarray, desc: str) -> torch.Tensor:
        """(len(rows), n_classes) on every process; each runs whole batches of its share."""
        size, here = self.batch_size, self.here
        mine = rows[distributed.batch_shard(len(rows), size, here.rank, here.size)]
        logits = torch.empty(0, len(self.source.manifest.class_names))
        if len(mine):
            prep = self.source.preprocessing
            dataset = self.source.dataset(mine, eval_transform(prep))
            loader = make_loader(dataset, size, self.workers, self.device)
            logits = predict_logits(self.model, loader, prep, self.device, desc, self.progress)[0]
        return distributed.gather_rows(logits, len(rows), size)


def _train_epochs(
    run: TrainingRun,
    evaluate: _Evaluator,
    val_idx: np.ndarray,
    backbone: str,
    params: FinetuneParams,
    progress: bool,
) -> tuple[list[dict], BestEpoch]:
    """Every epoch's training pass and val scoring: the history rows and the best epoch."""
    val_labels = torch.as_tensor(evaluate.source.manifest.label[val_idx], dtype=torch.long)
    history, best = [], BestEpoch()
    for epoch in range(1, params.epochs + 1):
        start = time.perf_counter()
        seen, loss_sum, correct = train_epoch(run, backbone, epoch, params, progress)
        train_s = time.perf_counter() - start
        seen, loss_sum, correct = distributed.all_sum([seen, loss_sum, correct])

        check_weights(evaluate.model, backbone, epoch, run.step, params)
        val_logits = evaluate(val_idx, "val")
        val_loss = nn.functional.cross_entropy(val_logits, val_labels).item()
        check_finite(val_loss, "val loss", backbone, epoch, run.step, params)
        val_acc = (val_logits.argmax(1) == val_labels).float().mean().item()
        history.append(
            {
                "epoch": epoch,
                "lr": round(run.optimizer.param_groups[0]["lr"], 8),
                "train_loss": round(loss_sum / seen, 6),
                "train_acc": round(correct / seen, 6),
                "val_loss": round(val_loss, 6),
                "val_acc": round(val_acc, 6),
                "train_s": round(train_s, 2),  # wall time of the training pass
            }
        )
        if progress:
            note(_epoch_line(backbone, params.epochs, history[-1], time.perf_counter() - start))
        best.offer(val_acc, val_loss, evaluate.model, epoch, val_logits)
    return history, best


def _score(
    manifest: Manifest, rows: _Rows, best: BestEpoch, evaluate: _Evaluator
) -> tuple[dict, dict | None]:
    """The val metrics of the best epoch, and the test metrics of its weights (now loaded;
    None without test rows)."""
    names = list(manifest.class_names)
    val_labels = manifest.label[rows.val]
    val_metrics = classification_metrics(val_labels, best.val_logits.argmax(1).numpy(), names)
    test_metrics = None
    if len(rows.test):
        test_logits = evaluate(rows.test, "test")
        test_metrics = classification_metrics(
            manifest.label[rows.test], test_logits.argmax(1).numpy(), names
        )
    return val_metrics, test_metrics


def write_history(history: list[dict], path: Path) -> None:
    """Per-epoch CSV for `dvc plots` (the papers' accuracy and loss curves), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())


def write_reports(result: FinetuneResult, backbone: str, paths: dict[str, Path]) -> None:
    """The per-epoch history CSV and its curves PNG, and the best epoch's val and test
    metrics JSON, at ``paths`` (`layout.finetune_reports`)."""
    write_history(result.history, paths["history"])
    plot_history(result.history, paths["curves"], f"{backbone} fine-tuning")
    write_json(
        paths["metrics"],
        {
            "best_epoch": result.record.best_epoch,
            "val": result.val_metrics,
            "test": result.test_metrics,
        },
    )
