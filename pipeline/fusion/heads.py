"""Fusion heads: classifiers over fused embeddings (or logits), one registered class each.

Every head follows the scikit-learn estimator contract, so `clone`, `get_params` and the
common tests in tests/test_heads.py work for a newly registered head without more code. A
fitted head is saved as JSON (params, classes, history) + safetensors (its arrays): loading
one, pulled from a team's DVC remote, never unpickles anything.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import sklearn
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.utils.validation import check_is_fitted
from torch import nn

from pipeline.config import BLOCK_NORMS
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.metrics import write_json
from pipeline.storage.atomic import atomic_dir
from pipeline.storage.feature_cache import LazyRows

HEADS: dict[str, type[Head]] = {}
HEAD_FILE, SIDECAR_FILE = "head.safetensors", "head.json"


def register_head(name: str):
    """Class decorator: make ``cls`` available to `make_head(name)` and the common tests."""

    def decorate(cls: type[Head]) -> type[Head]:
        if name in HEADS:
            raise ConfigError(f"Head {name!r} is registered twice ({HEADS[name].__name__}).")
        cls.name = name
        HEADS[name] = cls
        return cls

    return decorate


def list_heads() -> list[str]:
    """Registered head names, in registration order."""
    return list(HEADS)


def make_head(name: str, **params) -> Head:
    """An unfitted head ``name`` built with ``params``; unknown names and params raise ConfigError."""
    if name not in HEADS:
        raise ConfigError(f"Unknown head {name!r}; registered heads: {list_heads()}.")
    allowed = sorted(HEADS[name]._get_param_names())
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"Unknown parameter(s) {unknown} for head {name!r}; allowed: {allowed}.")
    head = HEADS[name](**params)
    head._validate_params()  # fail at configuration time, not after minutes of CV
    return head


# Parameter constraints: (predicate, what is allowed), checked by Head._validate_params.
def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _is_real(v) -> bool:
    return (_is_int(v) or isinstance(v, float | np.floating)) and math.isfinite(v)


INT_GE0 = (lambda v: _is_int(v) and v >= 0, "an int >= 0")
INT_GE1 = (lambda v: _is_int(v) and v >= 1, "an int >= 1")
POSITIVE = (lambda v: _is_real(v) and v > 0, "a float in (0, inf)")
NON_NEGATIVE = (lambda v: _is_real(v) and v >= 0, "a float in [0, inf)")
UNIT_HALF_OPEN = (lambda v: _is_real(v) and 0 <= v < 1, "a float in [0, 1)")
BOOL = (lambda v: isinstance(v, bool | np.bool_), "a bool")
SEED = (lambda v: v is None or (_is_int(v) and v >= 0), "an int >= 0 or None")
BLOCK_NORM = (lambda v: v in BLOCK_NORMS, f"one of {list(BLOCK_NORMS)}")
DIMS = (
    lambda v: (
        v is None or (isinstance(v, list | tuple) and len(v) > 0 and all(INT_GE1[0](d) for d in v))
    ),
    "None or a non-empty list of ints >= 1 (each backbone's embedding width)",
)


class BlockScaler:
    """Per-backbone block treatment of fused rows (n, sum(dims)), fitted on training rows.

    "none" leaves rows as they are; "standardize" gives every feature zero mean and unit
    variance; "l2" first divides each row's block by its L2 norm (backbones differ in
    activation scale), then standardizes, then weights each block by sqrt(mean dim / its
    dim) so that a 4096-d block does not outvote a 1280-d one (equal widths: weight 1).
    ``dims=None`` is one block. Fitting streams: `partial_fit` block of rows by block.
    """

    def __init__(self, norm: str, dims: list[int] | None):
        self.norm, self.dims = norm, dims
        self._n, self._sum, self._sumsq = 0, 0.0, 0.0

    def partial_fit(self, X: np.ndarray) -> BlockScaler:
        if self.norm != "none":
            Z = self._normalize(X).astype(np.float64)
            self._n += len(Z)
            self._sum = self._sum + Z.sum(axis=0)
            self._sumsq = self._sumsq + np.square(Z).sum(axis=0)
            mean = self._sum / self._n
            std = np.sqrt(np.maximum(self._sumsq / self._n - np.square(mean), 0.0))
            std[std < 1e-12] = 1.0  # a constant feature stays at 0, as in StandardScaler
            self.mean_, self.scale_ = mean, std / self._block_weights(len(mean))
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """(n, D) float32 rows, treated as fitted."""
        if self.norm == "none":
            return np.asarray(X, dtype=np.float32)
        return ((self._normalize(X) - self.mean_) / self.scale_).astype(np.float32)

    PREFIX = "scaler."  # its arrays' names among a head's

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted statistics, named for a head's safetensors file."""
        if self.norm == "none":
            return {}
        return {f"{self.PREFIX}mean": self.mean_, f"{self.PREFIX}scale": self.scale_}

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> BlockScaler:
        """Restore what `arrays` gave, from a head's arrays (others are ignored)."""
        if self.norm != "none":
            self.mean_, self.scale_ = arrays[f"{self.PREFIX}mean"], arrays[f"{self.PREFIX}scale"]
        return self

    def torch_module(self, width: int) -> nn.Module:
        """`transform` as a torch module on (n, ``width``) float32 rows (for the ONNX export)."""
        if self.norm == "none":
            return nn.Identity()
        return _ScaleRows(self._bounds(width) if self.norm == "l2" else [], self.mean_, self.scale_)

    def _bounds(self, width: int) -> list[tuple[int, int]]:
        edges = np.cumsum([0, *(self.dims or [width])]).tolist()
        return list(itertools.pairwise(edges))

    def _normalize(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if self.norm != "l2":
            return X
        out = np.empty_like(X)
        for a, b in self._bounds(X.shape[1]):
            norm = np.linalg.norm(X[:, a:b], axis=1, keepdims=True)
            out[:, a:b] = X[:, a:b] / np.maximum(norm, 1e-12)
        return out

    def _block_weights(self, width: int) -> np.ndarray:
        if self.norm != "l2":
            return np.ones(width)
        bounds = self._bounds(width)
        mean_dim = width / len(bounds)
        return np.concatenate([np.full(b - a, math.sqrt(mean_dim / (b - a))) for a, b in bounds])


class _ScaleRows(nn.Module):
    """BlockScaler.transform in torch: each block of ``l2_bounds`` divided by its L2 norm
    (none: no such step), then (x - mean) / scale."""

    def __init__(self, l2_bounds: list[tuple[int, int]], mean: np.ndarray, scale: np.ndarray):
        super().__init__()
        self.l2_bounds = l2_bounds
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.l2_bounds:  # x / max(||x||, 1e-12), as BlockScaler._normalize
            x = torch.cat([F.normalize(x[:, a:b], dim=1) for a, b in self.l2_bounds], dim=1)
        return (x - self.mean) / self.scale


class Head(ClassifierMixin, BaseEstimator):
    """Base of every head: input checks and label handling; subclasses write `_fit`/`_proba`.

    ``input`` says which fused input the head expects: "embeddings" (concatenated
    penultimate vectors) or "logits" (concatenated fine-tuned classifier outputs).
    ``streams`` says whether `fit` can learn from a LazyRows (block by block, for features
    larger than memory); every head predicts from one block by block.
    """

    name: ClassVar[str] = "head"
    input: ClassVar[str] = "embeddings"
    streams: ClassVar[bool] = False
    _constraints: ClassVar[dict[str, tuple]] = {}
    _fitted_json: ClassVar[tuple[str, ...]] = ()  # learned state saved as JSON, besides arrays

    def fit(self, X, y, X_val=None, y_val=None) -> Head:
        """Learn from ``X`` (n_samples, n_features) and ``y`` (n_samples,).

        ``X_val``, ``y_val`` (n_val, n_features), (n_val,): optional validation data for
        heads that select an epoch; the others ignore it. ``X`` and ``X_val`` may be
        LazyRows for a head that ``streams``.
        """
        self._validate_params()
        if isinstance(X, LazyRows) and not self.streams:
            raise DataError(
                f"{self.name} learns from an in-memory array only, not from {X!r}; read its "
                f"rows first ({X.nbytes} bytes) or use a head that streams: {streaming_heads()}."
            )
        X, y = self._check_xy(X, y, "X", "y")
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DataError(
                f"{self.name}: y holds a single class ({self.classes_.tolist()[0]!r}); "
                "a classifier needs at least 2."
            )
        self.n_features_in_ = X.shape[1]
        dims = getattr(self, "block_dims", None)
        if dims is not None and sum(dims) != X.shape[1]:
            raise DataError(
                f"{self.name}: block_dims {list(dims)} add up to {sum(dims)} features, "
                f"but X has {X.shape[1]}."
            )
        val = None
        if (X_val is None) != (y_val is None):
            raise ConfigError(f"{self.name}: give both X_val and y_val, or neither.")
        if X_val is not None:
            X_val, y_val = self._check_xy(X_val, y_val, "X_val", "y_val")
            self._check_width(X_val, "X_val")
            unseen = sorted(set(np.unique(y_val).tolist()) - set(self.classes_.tolist()))
            if unseen:
                raise DataError(f"{self.name}: y_val holds label(s) {unseen} absent from y.")
            val = (X_val, np.searchsorted(self.classes_, y_val))
        self._fit(X, y_idx, val)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n_samples, n_classes), columns in ``classes_`` order."""
        check_is_fitted(self, "classes_")
        X = self._check_x(X, "X")
        self._check_width(X, "X")
        if isinstance(X, LazyRows):
            return np.concatenate([self.predict_proba(X[rows]) for rows in _row_blocks(X)])
        proba = self._proba(X).astype(np.float64)
        return proba / proba.sum(axis=1, keepdims=True)  # float32 models sum to 1 +- 1e-7

    def predict(self, X) -> np.ndarray:
        """Predicted labels (n_samples,), taken from ``classes_``."""
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def refit_params(self) -> dict[str, Any]:
        """Params that repeat, without validation data, what validation chose in this fit
        (the MLP's best epoch); used to refit on train + val."""
        return {}

    def torch_module(self) -> nn.Module:
        """`predict_proba` as a torch module, (n, n_features_in_) float32 -> (n, n_classes)
        probabilities, for the ONNX export; each head brings its own."""
        raise CheckpointError(f"Head {self.name!r} cannot be exported: it has no torch_module.")

    def _fit(self, X: np.ndarray, y: np.ndarray, val: tuple | None) -> None:
        raise NotImplementedError

    def _proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _arrays(self) -> dict[str, np.ndarray]:
        """Learned arrays, saved as safetensors; `_set_arrays` restores them."""
        return {}

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        pass

    def _validate_params(self) -> None:
        for param, (ok, allowed) in self._constraints.items():
            value = getattr(self, param)
            if not ok(value):
                raise ConfigError(
                    f"The {param!r} parameter of {self.name} must be {allowed}. "
                    f"Got {value!r} instead."
                )

    def _check_x(self, X, what: str) -> np.ndarray | LazyRows:
        if isinstance(X, LazyRows):  # its rows are checked for NaN / inf as they are read
            if 0 in X.shape:
                raise DataError(f"{self.name}: {what} is empty (shape {X.shape}).")
            return X
        X = np.asarray(X)
        if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
            raise DataError(
                f"{self.name}: {what} must be a 2-D numeric array (n_samples, n_features). "
                f"Got shape {X.shape}, dtype {X.dtype}."
            )
        if X.shape[0] == 0 or X.shape[1] == 0:
            raise DataError(f"{self.name}: {what} is empty (shape {X.shape}).")
        X = X.astype(np.float32, copy=False)
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
        if bad.size:
            raise DataError(
                f"{self.name}: {what} has NaN or infinite values in {bad.size} row(s), "
                f"first row {bad[0]}."
            )
        return X

    def _check_xy(self, X, y, x_name: str, y_name: str) -> tuple:
        X, y = self._check_x(X, x_name), np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise DataError(
                f"{self.name}: {y_name} must be 1-D with one label per row of {x_name}: "
                f"{x_name} has shape {X.shape}, {y_name} has shape {y.shape}."
            )
        return X, y

    def _check_width(self, X, what: str) -> None:
        if X.shape[1] != self.n_features_in_:
            raise DataError(
                f"{self.name}: {what} has {X.shape[1]} features, "
                f"but the head was fitted on {self.n_features_in_}."
            )


def streaming_heads() -> list[str]:
    """Registered heads whose `fit` learns from a LazyRows block by block."""
    return [name for name, cls in HEADS.items() if cls.streams]


def _row_blocks(X) -> list[slice]:
    """The row blocks a head reads X by: a LazyRows' own blocks, or all rows of an array."""
    return X.block_slices() if isinstance(X, LazyRows) else [slice(0, len(X))]


def _softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, C) scores; a binary (n,) decision function becomes (n, 2)."""
    if scores.ndim == 1:
        scores = np.column_stack([-scores, scores])
    z = np.exp(scores - scores.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights n / (C * count_c), as scikit-learn's "balanced"."""
    return len(y) / (n_classes * np.bincount(y, minlength=n_classes))


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
        hidden=512,
        dropout=0.5,  # before the output layer, as in the paper
        epochs=50,
        patience=None,  # stop after this many epochs without a better val loss; None: never
        batch_size=128,  # 64 took 1.5x as long (an update costs more than a batch), ELPV no better
        lr=1e-3,
        lr_final=1e-4,
        weight_decay=0.0,
        class_weighted=False,  # cost accuracy on ELPV; the papers use none
        block_norm="standardize",
        block_dims=None,
        random_state=0,
        precision="auto",  # matmul dtype while training; weights and optimizer stay float32
    ):
        self.hidden = hidden
        self.patience = patience
        self.dropout = dropout
        self.epochs = epochs
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
        for rows in _row_blocks(X):  # one pass over the rows, block by block
            self.scaler_.partial_fit(X[rows])
        dtype = torch.bfloat16 if self.precision_ == "bfloat16" else torch.float32
        train = _Blocks(X, y, self._scale, dtype)  # cast once per block, not once per batch
        weight = None
        if self.class_weighted:
            weight = torch.tensor(_balanced_weights(y, len(self.classes_)), dtype=torch.float32)
        self.net_ = self._build(X.shape[1], len(self.classes_), gen)
        opt = torch.optim.RMSprop(
            self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        if val is not None:
            val = _Blocks(val[0], val[1], self._scale, torch.float32)
        self.history_, best_loss, best_state = [], math.inf, None
        for epoch in range(self.epochs):
            for group in opt.param_groups:
                group["lr"] = self._lr_at(epoch)
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
            elif (
                self.patience
                and val_loss is not None
                and epoch + 1 - self.best_epoch_ >= self.patience
            ):
                break  # the cosine schedule is the full run's; stopping only cuts it short
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

    def torch_module(self) -> nn.Module:
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

    def _lr_at(self, epoch: int) -> float:
        """Cosine decay from lr (first epoch) to lr_final (last epoch)."""
        frac = epoch / max(self.epochs - 1, 1)
        return self.lr_final + 0.5 * (self.lr - self.lr_final) * (1 + math.cos(math.pi * frac))

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
        self._slices = _row_blocks(X)
        self.n_rows = len(X)
        self._kept = None if isinstance(X, LazyRows) else [self._read(self._slices[0])]

    def __len__(self) -> int:
        return len(self._slices)

    def __getitem__(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._read(self._slices[block]) if self._kept is None else self._kept[block]

    def _read(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self._scale(self._X[rows])).to(self._dtype)
        return x, torch.from_numpy(self._y[rows].astype(np.int64))


class _LinearHead(Head):
    """Block treatment (fitted on the training X only), then a linear scikit-learn model.

    Only the model's coefficients are kept (``coef_`` (n_classes or 1, D), ``intercept_``),
    so the head saves as plain arrays; `_scores_to_proba` turns its scores into
    probabilities the way the scikit-learn model does.
    """

    def _estimator(self):
        raise NotImplementedError

    def _scores_to_proba(self, scores: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _fit(self, X, y, val):
        self.scaler_ = BlockScaler(self.block_norm, self.block_dims).partial_fit(X)
        model = self._estimator().fit(self.scaler_.transform(X), y)
        # binary RidgeClassifier gives coef_ (D,) in scikit-learn 1.8: keep (1, D) as documented
        self.coef_, self.intercept_ = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)

    def _proba(self, X):
        return self._scores_to_proba(self.scaler_.transform(X) @ self.coef_.T + self.intercept_)

    def _score_map(self, n_scores: int) -> np.ndarray:
        """(n_scores, n_classes): the softmax input as a linear map of the model's scores,
        which `_scores_to_proba` takes; multiclass: the identity."""
        return np.eye(n_scores)

    def torch_module(self) -> nn.Module:
        # the score map folded into the linear layer: one Linear, then softmax
        M = self._score_map(len(self.coef_))
        linear = nn.Linear(self.n_features_in_, M.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(M.T @ self.coef_))
            linear.bias.copy_(torch.from_numpy(self.intercept_ @ M))
        return nn.Sequential(
            self.scaler_.torch_module(self.n_features_in_), linear.eval(), nn.Softmax(1)
        )

    def _arrays(self):
        return {"coef": self.coef_, "intercept": self.intercept_} | self.scaler_.arrays()

    def _set_arrays(self, arrays):
        self.coef_, self.intercept_ = arrays["coef"], arrays["intercept"]
        self.scaler_ = BlockScaler(self.block_norm, self.block_dims).set_arrays(arrays)


LINEAR_CONSTRAINTS = {"class_weighted": BOOL, "block_norm": BLOCK_NORM, "block_dims": DIMS}


@register_head("logreg")
class LogRegHead(_LinearHead):
    """Multinomial logistic regression; lbfgs, deterministic (no random state)."""

    _constraints: ClassVar = {"C": POSITIVE, "max_iter": INT_GE1, **LINEAR_CONSTRAINTS}

    def __init__(
        self, C=1.0, max_iter=1000, class_weighted=False, block_norm="standardize", block_dims=None
    ):
        self.C = C
        self.max_iter = max_iter
        self.class_weighted = class_weighted
        self.block_norm = block_norm
        self.block_dims = block_dims

    def _estimator(self):
        return LogisticRegression(
            C=self.C,
            max_iter=self.max_iter,
            class_weight="balanced" if self.class_weighted else None,
        )

    def _score_map(self, n_scores):
        return np.array([[0.0, 1.0]]) if n_scores == 1 else np.eye(n_scores)

    def _scores_to_proba(self, scores):
        if scores.shape[1] == 1:  # binary: one logit for the second class
            return _softmax(np.column_stack([np.zeros(len(scores)), scores[:, 0]]))
        return _softmax(scores)


@register_head("ridge")
class RidgeHead(_LinearHead):
    """Ridge classifier; probabilities are the softmax of its decision function."""

    _constraints: ClassVar = {"alpha": POSITIVE, **LINEAR_CONSTRAINTS}

    def __init__(self, alpha=1.0, class_weighted=False, block_norm="standardize", block_dims=None):
        self.alpha = alpha
        self.class_weighted = class_weighted
        self.block_norm = block_norm
        self.block_dims = block_dims

    def _estimator(self):
        return RidgeClassifier(
            alpha=self.alpha, class_weight="balanced" if self.class_weighted else None
        )

    def _scores_to_proba(self, scores):
        return _softmax(scores[:, 0] if scores.shape[1] == 1 else scores)  # margins as scores

    def _score_map(self, n_scores):
        return np.array([[-1.0, 1.0]]) if n_scores == 1 else np.eye(n_scores)


@register_head("late")
class LateFusionHead(Head):
    """Score-level fusion: the mean over K models of softmax(each model's logits).

    Input (n_samples, K * n_classes): the K fine-tuned classifiers' logits side by side,
    columns of each block in label order. Fitting learns only ``classes_`` and
    ``n_models_`` (K); nothing is trained.
    """

    input: ClassVar[str] = "logits"
    _fitted_json: ClassVar = ("n_models_",)

    def _fit(self, X, y, val):
        n_classes = len(self.classes_)
        if X.shape[1] % n_classes:
            raise DataError(
                f"late: X has {X.shape[1]} columns, not a multiple of the {n_classes} classes "
                "in y; expected K * n_classes logits for K models."
            )
        self.n_models_ = X.shape[1] // n_classes

    def torch_module(self) -> nn.Module:
        return _MeanSoftmax(self.n_models_, len(self.classes_))

    def _proba(self, X):
        blocks = X.astype(np.float64).reshape(len(X), self.n_models_, len(self.classes_))
        z = np.exp(blocks - blocks.max(axis=2, keepdims=True))
        return (z / z.sum(axis=2, keepdims=True)).mean(axis=1)


class _MeanSoftmax(nn.Module):
    """LateFusionHead in torch: (n, K * C) logits -> mean over K of each block's softmax."""

    def __init__(self, n_models: int, n_classes: int):
        super().__init__()
        self.n_models, self.n_classes = n_models, n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(-1, self.n_models, self.n_classes)
        return torch.softmax(blocks, dim=2).mean(dim=1)


def save_head(head: Head, directory: Path | str, sidecar: dict[str, Any]) -> Path:
    """Write ``head`` to ``directory``: head.json (``sidecar``, the head's name, params and
    learned JSON state) and head.safetensors (its learned arrays).

    Both are written to a temporary folder beside it, which then replaces ``directory``
    whole: an error or a kill leaves the previous head (if any) untouched.
    """
    check_is_fitted(head, "classes_")
    fitted = {k: getattr(head, k) for k in ("n_features_in_", *head._fitted_json)}
    meta = {
        **sidecar,
        "head": head.name,
        "params": head.get_params(),
        "classes": head.classes_.tolist(),
        "fitted": fitted,
        "versions": {"sklearn": sklearn.__version__, "torch": torch.__version__},
    }
    arrays = {k: np.ascontiguousarray(v) for k, v in head._arrays().items()}
    with atomic_dir(directory) as tmp:
        write_json(tmp / SIDECAR_FILE, meta)
        save_file(arrays, str(tmp / HEAD_FILE))
    return Path(directory)


def load_head(directory: Path | str) -> tuple[Head, dict[str, Any]]:
    """The head and its sidecar (the head.json mapping) saved by `save_head` in ``directory``.

    Nothing is unpickled: the head is rebuilt from its registered class, its params and
    classes in head.json, and the arrays in head.safetensors.
    """
    directory = Path(directory)
    paths = directory / HEAD_FILE, directory / SIDECAR_FILE
    if (directory / "head.joblib").exists() and not paths[0].exists():
        raise CheckpointError(
            f"{directory / 'head.joblib'} is a pickled head from an older defuse; pickles are "
            f"not loaded (they can run code). Re-run `defuse fuse {directory.name}`."
        )
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(f"Fitted head incomplete: missing {missing}.")
    try:
        meta = _read_json(paths[1])
        name, params, classes = meta["head"], meta["params"], meta["classes"]
        fitted = meta["fitted"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{paths[1]} is not a head sidecar: {exc!r}") from exc
    try:
        arrays = load_file(str(paths[0]))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{paths[0]} is not a safetensors file: {exc}") from exc
    try:
        head = make_head(name, **params)
        head.classes_ = np.asarray(classes)
        for key, value in fitted.items():
            setattr(head, key, value)
        head._set_arrays(arrays)
    except (ConfigError, KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"{directory}: head.json and head.safetensors do not make a {name!r} head: {exc}"
        ) from exc
    return head, meta


def _read_json(path: Path) -> dict[str, Any]:
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"expected an object, got {type(meta).__name__}")
    return meta
