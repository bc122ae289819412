"""Transfer learning of one backbone on the manifest, as the fusion paper does it.

New n-class layer behind dropout, leading stages frozen, online augmentation, RMSprop (or
SGD) with the learning rate decaying from ``lr`` to ``lr_final``, the best epoch chosen on
the validation split. The test split is only scored, once, with the chosen weights.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from pipeline import distributed
from pipeline.config import FinetuneParams, asdict
from pipeline.data.manifest import Manifest
from pipeline.data.transforms import (
    ImageDataset,
    eval_transform,
    model_input,
    target_info,
    train_transform,
)
from pipeline.errors import ConfigError, DataError, DefuseError
from pipeline.metrics import classification_metrics
from pipeline.models.checkpoint import CheckpointRecord, save_checkpoint
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.registry import create_backbone, embed, freeze_stages, set_train_mode
from pipeline.optim import class_weights, cosine_lr
from pipeline.progress import Progress, note, tracked
from pipeline.runtime import autocast, library_versions, prepare_model, resolve_device
from pipeline.storage.atomic import write_text
from pipeline.storage.image_cache import open_image_cache

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "train_s")


@dataclass(frozen=True)
class FinetuneResult:
    record: CheckpointRecord  # as save_checkpoint wrote it; on ranks > 0 weights_sha256 is ""
    history: list[dict]  # one row per epoch, HISTORY_FIELDS
    val_metrics: dict
    test_metrics: dict | None  # None when the manifest has no test rows


def _optimizer(params: FinetuneParams, trainable) -> torch.optim.Optimizer:
    if params.optimizer == "rmsprop":  # Keras' RMSprop, which the paper used, has rho 0.9
        return torch.optim.RMSprop(
            trainable,
            lr=params.lr,
            alpha=0.9,
            momentum=params.momentum,
            weight_decay=params.weight_decay,
        )
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            trainable, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay
        )
    return torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)


def _loader(dataset, batch_size: int, num_workers: int, device, sampler=None):
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        drop_last=False,
    )


def _rank_batch(batch_size: int, n_processes: int) -> int:
    """Each process's share of the global batch ``finetune.batch_size``."""
    if batch_size % n_processes:
        raise ConfigError(
            f"finetune.batch_size={batch_size} is the global batch and must divide evenly "
            f"among the {n_processes} processes torchrun started (world size {n_processes}); "
            f"use a multiple of {n_processes}."
        )
    return batch_size // n_processes


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    loader: DataLoader,
    preprocessing: Preprocessing,
    device,
    desc: str = "eval",
    progress: bool = True,
):
    """Logits ``(n, n_classes)`` and labels ``(n,)`` for every batch of ``loader``."""
    model.eval()
    logits, labels = [], []
    for images, y, _ in tracked(loader, desc, "batch", every=None, enabled=progress):
        with autocast(device):
            x = model_input(images, preprocessing, device)
            logits.append(embed(model, x)[1].float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


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
    train_idx, val_idx, test_idx = (manifest.indices(s) for s in ("train", "val", "test"))
    if held_out is not None:
        train_idx, test_idx = np.setdiff1d(train_idx, held_out), test_idx[:0]
    for split, idx in (("train", train_idx), ("val", val_idx)):
        if len(idx) == 0:
            raise DataError(
                f"{manifest.path}: the {split} split is empty; fine-tuning needs both train and val rows."
            )
    n_classes = len(manifest.class_names)
    device = resolve_device(params.device)
    rank_batch = _rank_batch(params.batch_size, distributed.world().size)
    info = target_info(backbone, params)
    prep = info.preprocessing
    cache = open_image_cache(images, prep, backbone) if images is not None else None

    def dataset(rows: np.ndarray, transform) -> ImageDataset:
        squares = cache.manifest_squares(manifest, rows) if cache else None
        return ImageDataset.from_manifest(manifest, rows, transform, prep.input_size, squares)

    # A forked RNG keeps the seed local: head init, augmentation and dropout follow it.
    with distributed.process_group(device) as here, torch.random.fork_rng(devices=[]):
        progress = progress and here.is_main
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
        train_model = model  # under torchrun the DDP wrapper; `model` is evaluated and saved
        if here.size > 1:
            cuda = device.type == "cuda"
            train_model = DistributedDataParallel(
                model, device_ids=[device.index] if cuda else None
            )

        train_set = dataset(train_idx, train_transform(prep, params))
        # One permutation per epoch whatever the world size; rank r takes every size-th sample
        # of it, so a step's global batch holds the same samples as a single process's batch.
        sampler = DistributedSampler(
            train_set, here.size, here.rank, shuffle=True, seed=params.seed
        )
        train_loader = _loader(train_set, rank_batch, params.num_workers, device, sampler)
        # From the image cache an eval batch is a copy and a normalisation, so it runs in this
        # process: workers forked after the first epoch would share its grown, kept heap, and
        # every page it then writes would be a copy-on-write fault (README, page faults).
        eval_workers = 0 if cache else params.num_workers

        def eval_logits(rows: np.ndarray, desc: str) -> torch.Tensor:
            """(len(rows), n_classes) on every process; each runs whole batches of its share."""
            size = params.eval_batch_size
            mine = rows[distributed.batch_shard(len(rows), size, here.rank, here.size)]
            logits = torch.empty(0, n_classes)
            if len(mine):
                loader = _loader(dataset(mine, eval_transform(prep)), size, eval_workers, device)
                logits = predict_logits(model, loader, prep, device, desc, progress)[0]
            return distributed.gather_rows(logits, len(rows), size)

        val_labels = torch.as_tensor(manifest.label[val_idx], dtype=torch.long)
        weight = (
            torch.tensor(class_weights(manifest.label[train_idx], n_classes), dtype=torch.float32)
            if params.class_weighted
            else None
        )
        criterion = nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(params, trainable)
        total_steps = params.epochs * len(train_loader)

        history, best, best_state, step = [], None, None, 0
        for epoch in range(1, params.epochs + 1):
            set_train_mode(train_model)
            sampler.set_epoch(epoch)
            seen, loss_sum, correct = 0, 0.0, 0
            start = time.perf_counter()
            bar = Progress(
                len(train_loader),
                f"{backbone} epoch {epoch}/{params.epochs}",
                "batch",
                every=None,  # the epoch's line below says it in a log
                enabled=progress,
            )
            for images, labels, _ in train_loader:
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(step, total_steps, params.lr, params.lr_final)
                images, labels = model_input(images, prep, device), labels.to(device)
                with autocast(device):
                    logits = train_model(images)
                    loss = criterion(logits.float(), labels)
                step += 1
                batch_loss = (
                    loss.item()
                )  # this rank's; a NaN spreads to all through DDP's gradients
                _check_finite(batch_loss, "training loss", backbone, epoch, step, params)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += len(labels)
                loss_sum += batch_loss * len(labels)
                correct += (logits.argmax(1) == labels).sum().item()
                bar.update(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            bar.close()
            train_s = time.perf_counter() - start
            seen, loss_sum, correct = distributed.all_sum([seen, loss_sum, correct])

            _check_weights(model, backbone, epoch, step, params)
            val_logits = eval_logits(val_idx, "val")
            val_loss = nn.functional.cross_entropy(val_logits, val_labels).item()
            _check_finite(val_loss, "val loss", backbone, epoch, step, params)
            val_acc = (val_logits.argmax(1) == val_labels).float().mean().item()
            history.append(
                {
                    "epoch": epoch,
                    "lr": round(optimizer.param_groups[0]["lr"], 8),
                    "train_loss": round(loss_sum / seen, 6),
                    "train_acc": round(correct / seen, 6),
                    "val_loss": round(val_loss, 6),
                    "val_acc": round(val_acc, 6),
                    "train_s": round(train_s, 2),  # wall time of the training pass
                }
            )
            if progress:
                note(_epoch_line(backbone, params.epochs, history[-1], time.perf_counter() - start))
            # Best epoch: highest val accuracy, the papers' metric; lower val loss breaks ties.
            key = (val_acc, -val_loss)
            if best is None or key > best:
                best, best_state = key, copy.deepcopy(model.state_dict())
                best_epoch, best_val_logits = epoch, val_logits

        model.load_state_dict(best_state)
        names = list(manifest.class_names)
        val_metrics = classification_metrics(
            val_labels.numpy(), best_val_logits.argmax(1).numpy(), names
        )
        test_metrics = None
        if len(test_idx):
            test_logits = eval_logits(test_idx, "test")
            test_metrics = classification_metrics(
                manifest.label[test_idx], test_logits.argmax(1).numpy(), names
            )

        record = CheckpointRecord(
            backbone=backbone,
            class_names=tuple(names),
            dim=info.dim,
            preprocessing=prep,  # extract and predict read it from here, never from params
            params=asdict(params),
            world_size=here.size,
            best_epoch=best_epoch,
            val_metrics={k: val_metrics[k] for k in ("accuracy", "f1_macro", "n")},
            manifest_sha256=manifest.sha256,
            held_out=None if held_out is None else tuple(manifest.sample_id[i] for i in held_out),
            versions=library_versions(),
        )
        if here.is_main:
            record = save_checkpoint(model.cpu(), out_dir, record)
        distributed.barrier()
    return FinetuneResult(record, history, val_metrics, test_metrics)


class DivergedError(DefuseError):
    """Fine-tuning whose loss or weights stopped being finite numbers."""


def _check_finite(
    value: float, what: str, backbone: str, epoch: int, step: int, params: FinetuneParams
) -> None:
    """DivergedError naming where ``value`` (a loss; NaN for non-finite weights) stopped being
    finite: raised before anything is written, so no checkpoint or metrics of it exist."""
    if not math.isfinite(value):
        raise DivergedError(
            f"{backbone}: the {what} is {value} at epoch {epoch}, step {step} (finetune.lr="
            f"{params.lr}): training diverged; nothing was written. Lower finetune.lr."
        )


def _check_weights(
    model: nn.Module, backbone: str, epoch: int, step: int, params: FinetuneParams
) -> None:
    """`_check_finite` for the weights (and buffers) after an epoch: a step can leave them
    non-finite while its own loss was still finite."""
    for name, weights in model.state_dict().items():
        if weights.is_floating_point() and not torch.isfinite(weights).all():
            _check_finite(math.nan, f"weight {name}", backbone, epoch, step, params)


def write_history(history: list[dict], path: Path) -> None:
    """Per-epoch CSV for `dvc plots` (the papers' accuracy and loss curves), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())
