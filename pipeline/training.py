"""One supervised training run's mechanics: the optimizer, the loaders, a training pass, the
eval logits, the best epoch kept and divergence caught. Manifests, checkpoints and the
process group are pipeline/finetune.py's."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.config import FinetuneParams
from pipeline.data.transforms import model_input
from pipeline.errors import DefuseError
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.registry import embed, set_train_mode
from pipeline.optim import cosine_lr
from pipeline.progress import Progress, tracked
from pipeline.runtime import autocast


def make_optimizer(params: FinetuneParams, trainable) -> torch.optim.Optimizer:
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


def make_loader(dataset, batch_size: int, num_workers: int, device, sampler=None):
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        drop_last=False,
    )


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


@dataclass
class TrainingRun:
    """What the training passes share; ``step`` counts the optimizer steps taken so far."""

    model: nn.Module  # under torchrun the DDP wrapper
    loader: DataLoader
    sampler: DistributedSampler
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    preprocessing: Preprocessing
    device: torch.device
    total_steps: int
    step: int = 0


def train_epoch(
    run: TrainingRun, backbone: str, epoch: int, params: FinetuneParams, progress: bool
) -> tuple[int, float, int]:
    """One pass over this rank's train rows: its sample count, loss sum and correct count."""
    set_train_mode(run.model)
    run.sampler.set_epoch(epoch)
    seen, loss_sum, correct = 0, 0.0, 0
    bar = Progress(
        len(run.loader),
        f"{backbone} epoch {epoch}/{params.epochs}",
        "batch",
        every=None,  # the epoch's line says it in a log
        enabled=progress,
    )
    for images, labels, _ in run.loader:
        for group in run.optimizer.param_groups:
            group["lr"] = cosine_lr(run.step, run.total_steps, params.lr, params.lr_final)
        images, labels = model_input(images, run.preprocessing, run.device), labels.to(run.device)
        with autocast(run.device):
            logits = run.model(images)
            loss = run.criterion(logits.float(), labels)
        run.step += 1
        batch_loss = loss.item()  # this rank's; a NaN spreads to all through DDP's gradients
        check_finite(batch_loss, "training loss", backbone, epoch, run.step, params)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        seen += len(labels)
        loss_sum += batch_loss * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        bar.update(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    bar.close()
    return seen, loss_sum, correct


@dataclass
class BestEpoch:
    """The best epoch so far: highest val accuracy, the papers' metric; lower val loss
    breaks ties. ``state`` is a copy of the model's weights then."""

    key: tuple | None = None
    state: dict | None = None
    epoch: int = 0
    val_logits: torch.Tensor | None = None

    def offer(self, val_acc: float, val_loss: float, model, epoch, val_logits) -> None:
        key = (val_acc, -val_loss)
        if self.key is None or key > self.key:
            self.key, self.state = key, copy.deepcopy(model.state_dict())
            self.epoch, self.val_logits = epoch, val_logits


class DivergedError(DefuseError):
    """Fine-tuning whose loss or weights stopped being finite numbers."""


def check_finite(
    value: float, what: str, backbone: str, epoch: int, step: int, params: FinetuneParams
) -> None:
    """DivergedError naming where ``value`` (a loss; NaN for non-finite weights) stopped being
    finite: raised before anything is written, so no checkpoint or metrics of it exist."""
    if not math.isfinite(value):
        raise DivergedError(
            f"{backbone}: the {what} is {value} at epoch {epoch}, step {step} (finetune.lr="
            f"{params.lr}): training diverged; nothing was written. Lower finetune.lr."
        )


def check_weights(
    model: nn.Module, backbone: str, epoch: int, step: int, params: FinetuneParams
) -> None:
    """`check_finite` for the weights (and buffers) after an epoch: a step can leave them
    non-finite while its own loss was still finite."""
    for name, weights in model.state_dict().items():
        if weights.is_floating_point() and not torch.isfinite(weights).all():
            check_finite(math.nan, f"weight {name}", backbone, epoch, step, params)
