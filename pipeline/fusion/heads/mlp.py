"""The fusion paper's classifier as a head: an MLP in torch, fitted in memory or streamed
block by block from the feature caches."""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.fusion.heads.base import (
    BLOCK_NORM,
    BOOL,
    DIMS,
    INT_GE0,
    INT_GE1,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    UNIT_HALF_OPEN,
    Head,
    register_head,
    row_blocks,
)
from pipeline.fusion.heads.scaling import BlockScaler
from pipeline.optim import class_weights, cosine_lr
from pipeline.storage.fused import LazyRows

PRECISIONS = ("auto", "float32", "bfloat16")


def _resolve_precision(precision: str) -> str:
    """Resolve "auto": bfloat16 where the CPU multiplies it natively, else float32."""
    if precision != "auto":
        return precision
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return "bfloat16" if native else "float32"


@register_head("mlp")
class MLPHead(Head):
    """The fusion paper's classifier: standardize -> Linear -> ReLU -> Dropout -> Linear.

    ``hidden=0`` drops the hidden layer (standardize -> Dropout -> Linear). RMSprop, learning
    rate cosine-decayed from ``lr`` to ``lr_final`` over the epochs, inverse-frequency class
    weights in the loss when ``class_weighted``. With validation data the kept weights are
    those of the epoch with the lowest validation loss (the training loss's criterion, so
    class-weighted too; it is smoother than accuracy on small validation sets), recorded as
    ``best_epoch_``; without, the last epoch's. ``history_`` holds one dict per epoch.
    Deterministic for an int ``random_state``: one torch.Generator drives init, shuffling
    and dropout; global torch seeds are left alone.

    Streams: X (and X_val) may be LazyRows. Then the scaler is fitted block by block in a
    first pass, each epoch visits the blocks in a random order and shuffles the rows within
    each, and validation is scored block by block; memory holds one block at a time. An
    in-memory X is the same loop with a single block of all rows.
    """

    streams: ClassVar[bool] = True
    _constraints: ClassVar = {
        "hidden": INT_GE0,
        "dropout": UNIT_HALF_OPEN,
        "epochs": INT_GE1,
        "patience": (lambda v: v is None or INT_GE1[0](v), "an int >= 1 or None"),
        "batch_size": INT_GE1,
        "lr": POSITIVE,
        "lr_final": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "class_weighted": BOOL,
        "block_norm": BLOCK_NORM,
        "block_dims": DIMS,
        "random_state": SEED,
        "precision": (lambda v: v in PRECISIONS, f"one of {list(PRECISIONS)}"),
    }
    _fitted_json: ClassVar = ("best_epoch_", "history_", "precision_")

    def __init__(
        self,
        *,
        hidden,  # 0: no hidden layer
        dropout,  # before the output layer
        epochs,
        patience,  # stop after this many epochs without a better val loss; None: never
        batch_size,
        lr,  # cosine-decayed to lr_final over the epochs
        lr_final,
        weight_decay,
        class_weighted,
        block_norm,
        block_dims,
        random_state,
        precision,  # matmul dtype while training; weights and optimizer stay float32
    ):
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.patience = patience
        self.batch_size = batch_size
        self.lr = lr
        self.lr_final = lr_final
        self.weight_decay = weight_decay
        self.class_weighted = class_weighted
        self.block_norm = block_norm
        self.block_dims = block_dims
        self.random_state = random_state
        self.precision = precision

    def _fit(self, X, y, val):
        gen = torch.Generator()
        if self.random_state is None:
            gen.seed()
        else:
            gen.manual_seed(self.random_state)
        self.precision_ = _resolve_precision(self.precision)
        self.scaler_ = BlockScaler(self.block_norm, self.block_dims)
        for rows in row_blocks(X):  # one pass over the rows, block by block
            self.scaler_.partial_fit(X[rows])
        dtype = torch.bfloat16 if self.precision_ == "bfloat16" else torch.float32
        train = _Blocks(X, y, self._scale, dtype)  # cast once per block, not once per batch
        weight = None
        if self.class_weighted:
            weight = torch.tensor(class_weights(y, len(self.classes_)), dtype=torch.float32)
        self.net_ = self._build(X.shape[1], len(self.classes_), gen)
        if val is not None:
            val = _Blocks(val[0], val[1], self._scale, torch.float32)
        self._train(train, val, weight, gen)

    def _train(self, train: _Blocks, val: _Blocks | None, weight, gen) -> None:
        """The epochs: keep the weights of the lowest val loss (or the last epoch's without
        val), stopping after ``patience`` epochs without a better one."""
        opt = torch.optim.RMSprop(
            self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        self.history_, best_loss, best_state = [], math.inf, None
        for epoch in range(self.epochs):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(epoch, self.epochs - 1, self.lr, self.lr_final)
            train_loss, train_acc = self._train_epoch(opt, train, weight, gen)
            val_loss, val_acc = self._evaluate(val, weight) if val is not None else (None, None)
            self.history_.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "val_loss": val_loss,  # None without validation data: same keys for plots
                    "val_acc": val_acc,
                }
            )
            if val_loss is not None and val_loss < best_loss:
                best_loss, self.best_epoch_ = val_loss, epoch + 1
                best_state = {k: v.clone() for k, v in self.net_.state_dict().items()}
            elif val_loss is not None and self.patience:
                stale = epoch + 1 - self.best_epoch_
                if stale >= self.patience:  # the cosine schedule is the full run's: cut short
                    break
        if best_state is None:
            self.best_epoch_ = self.epochs
        else:
            self.net_.load_state_dict(best_state)
        self.net_.eval()

    def _train_epoch(self, opt, train: _Blocks, weight, gen) -> tuple[float, float]:
        """One pass over shuffled mini-batches; (mean loss, accuracy) with dropout on."""
        body, out = self.net_[:-2], self.net_[-1]  # dropout by hand, drawn from `gen`
        self.net_.train()
        total_loss, correct = 0.0, 0
        # Blocks in random order, rows shuffled within each; randperm(1) draws nothing, so
        # one block shuffles exactly as the whole-matrix loop did.
        for block in torch.randperm(len(train), generator=gen).tolist():
            x, t = train[block]
            for idx in torch.randperm(len(x), generator=gen).split(self.batch_size):
                xb, tb = x.index_select(0, idx), t[idx]  # whole rows: 7x faster than x[idx]
                with torch.autocast("cpu", torch.bfloat16, enabled=x.dtype == torch.bfloat16):
                    h = body(xb)
                    if self.dropout > 0:
                        keep = torch.rand(h.shape, generator=gen) >= self.dropout
                        h = h * keep / (1.0 - self.dropout)
                    logits = out(h).float()
                loss = F.cross_entropy(logits, tb, weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total_loss += loss.item() * len(tb)
                correct += (logits.argmax(1) == tb).sum().item()
        return total_loss / train.n_rows, correct / train.n_rows

    def _evaluate(self, val: _Blocks, weight) -> tuple[float, float]:
        """(loss, accuracy) in eval mode and float32, as `predict_proba` computes them.

        Each block's mean loss counts by its share of the (class-weighted) rows, so one block
        gives its own mean exactly and several the mean over all rows.
        """
        losses, shares, correct = [], [], 0
        with torch.inference_mode():
            self.net_.eval()
            for block in range(len(val)):
                x, t = val[block]
                logits = self.net_(x)
                losses.append(F.cross_entropy(logits, t, weight=weight).item())
                shares.append(float(len(t)) if weight is None else weight[t].sum().item())
                correct += (logits.argmax(1) == t).sum().item()
        total = sum(shares)
        loss = sum(part * (w / total) for part, w in zip(losses, shares, strict=True))
        return loss, correct / val.n_rows

    def _proba(self, X):
        with torch.inference_mode():
            logits = self.net_.eval()(torch.from_numpy(self._scale(X)))
        return torch.softmax(logits.double(), dim=1).numpy()

    def _scale(self, X: np.ndarray) -> np.ndarray:
        return self.scaler_.transform(X)

    def _torch_module(self) -> nn.Module:
        net = copy.deepcopy(self.net_).eval().float()
        return nn.Sequential(self.scaler_.torch_module(self.n_features_in_), net, nn.Softmax(1))

    def refit_params(self) -> dict[str, Any]:
        return {"epochs": self.best_epoch_, "patience": None}

    def _arrays(self):
        net = {f"net.{k}": v.numpy() for k, v in self.net_.state_dict().items()}
        return net | self.scaler_.arrays()

    def _set_arrays(self, arrays):
        self.scaler_ = BlockScaler(self.block_norm, self.block_dims).set_arrays(arrays)
        self.net_ = self._build(self.n_features_in_, len(self.classes_))
        self.net_.load_state_dict(
            {
                k[len("net.") :]: torch.from_numpy(v)
                for k, v in arrays.items()
                if k.startswith("net.")
            }
        )
        self.net_.eval()

    def _array_shapes(self):
        dim, n_classes = self.n_features_in_, len(self.classes_)
        if self.hidden:  # Linear, ReLU, Dropout, Linear
            net = {"0": (self.hidden, dim), "3": (n_classes, self.hidden)}
        else:  # Dropout, Linear
            net = {"1": (n_classes, dim)}
        shapes = {}
        for layer, (n_out, n_in) in net.items():
            shapes |= {f"net.{layer}.weight": (n_out, n_in), f"net.{layer}.bias": (n_out,)}
        return shapes | BlockScaler(self.block_norm, self.block_dims).array_shapes(dim)

    def _build(self, dim: int, n_classes: int, gen: torch.Generator | None = None) -> nn.Sequential:
        """The network; weights drawn from ``gen``, or left for a state dict when None."""

        def linear(n_in, n_out):  # skip_init: nn.Linear would draw from the global RNG
            return torch.nn.utils.skip_init(nn.Linear, n_in, n_out)

        if self.hidden:
            layers = [linear(dim, self.hidden), nn.ReLU(), nn.Dropout(self.dropout)]
            layers.append(linear(self.hidden, n_classes))
        else:
            layers = [nn.Dropout(self.dropout), linear(dim, n_classes)]
        net = nn.Sequential(*layers)
        if gen is None:
            return net
        with torch.no_grad():  # torch's default Linear init, drawn from `gen`
            for layer in net:
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=gen)
                    layer.bias.uniform_(-bound, bound, generator=gen)
        return net


class _Blocks:
    """(standardized rows as a tensor of ``dtype``, int64 labels) of X, y block by block.

    An in-memory X is one block, converted once and kept: a fit visits it every epoch. A
    LazyRows is read, standardized and converted anew at every visit, so memory holds one
    block at a time however large X is.
    """

    def __init__(self, X, y: np.ndarray, scale, dtype: torch.dtype):
        self._X, self._y, self._scale, self._dtype = X, y, scale, dtype
        self._slices = row_blocks(X)
        self.n_rows = len(X)
        self._kept = None if isinstance(X, LazyRows) else [self._read(self._slices[0])]

    def __len__(self) -> int:
        return len(self._slices)

    def __getitem__(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._read(self._slices[block]) if self._kept is None else self._kept[block]

    def _read(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self._scale(self._X[rows])).to(self._dtype)
        return x, torch.from_numpy(self._y[rows].astype(np.int64))
