"""The head contract: the `Head` base class, the registry (`register_head`, `make_head`,
`list_heads`) and the parameter constraints every head declares.

A head follows the scikit-learn estimator contract, so `clone`, `get_params` and the
common tests in tests/test_heads.py work for a newly registered head without more code.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from pipeline.calibration import EPS, tempered
from pipeline.config import BLOCK_NORMS
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.storage.fused import LazyRows

HEADS: dict[str, type[Head]] = {}
INPUTS = ("embeddings", "logits")  # what a head reads: penultimate vectors or classifier outputs
BASE_FITTED = ("n_features_in_", "temperature_")  # learned JSON state of every head


def register_head(name: str):
    """Class decorator: make ``cls`` available to `make_head(name)` and the common tests."""

    def decorate(cls: type[Head]) -> type[Head]:
        if name in HEADS:
            raise ConfigError(f"Head {name!r} is registered twice ({HEADS[name].__name__}).")
        if cls.input not in INPUTS:
            raise ConfigError(f"Head {name!r} reads {cls.input!r}; allowed: {list(INPUTS)}.")
        cls.name = name
        HEADS[name] = cls
        return cls

    return decorate


def list_heads() -> list[str]:
    """Registered head names, in registration order."""
    return list(HEADS)


def streaming_heads() -> list[str]:
    """Registered heads whose `fit` learns from a LazyRows block by block."""
    return [name for name, cls in HEADS.items() if cls.streams]


def head_class(name: str) -> type[Head]:
    """The class registered as ``name``; ConfigError listing the registered ones otherwise."""
    if name not in HEADS:
        raise ConfigError(f"Unknown head {name!r}; registered heads: {list_heads()}.")
    return HEADS[name]


def check_param_names(name: str, params: dict[str, Any], *, complete: bool) -> None:
    """ConfigError when ``params`` name a parameter head ``name`` does not take or, with
    ``complete``, lack one it does: params.yaml gives every one (there are no defaults)."""
    allowed = sorted(head_class(name)._get_param_names())
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"Unknown parameter(s) {unknown} for head {name!r}; allowed: {allowed}.")
    missing = sorted(set(allowed) - set(params)) if complete else []
    if missing:
        raise ConfigError(
            f"Head {name!r} lacks parameter(s) {missing}: give them in its params.yaml entry."
        )


def make_head(name: str, **params) -> Head:
    """An unfitted head ``name`` built with ``params``, every one of them given;
    unknown names, unknown, missing or bad params raise ConfigError."""
    check_param_names(name, params, complete=True)
    head = HEADS[name](**params)
    head._validate_params()  # fail at configuration time, not after minutes of CV
    return head


def by_input(head: Head | type[Head], *, embeddings, logits):
    """``embeddings`` or ``logits``, whichever ``head`` reads (its ``input``): the one place
    that dispatches on it, for fit, compare, predict and export alike."""
    return embeddings if head.input == "embeddings" else logits


def row_blocks(X) -> list[slice]:
    """The row blocks a head reads X by: a LazyRows' own blocks, or all rows of an array."""
    return X.block_slices() if isinstance(X, LazyRows) else [slice(0, len(X))]


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


class Head(ClassifierMixin, BaseEstimator):
    """Base of every head: input checks and label handling; subclasses write `_fit`/`_proba`.

    ``input`` says which fused input the head expects: "embeddings" (concatenated
    penultimate vectors) or "logits" (concatenated fine-tuned classifier outputs).
    ``streams`` says whether `fit` can learn from a LazyRows (block by block, for features
    larger than memory); every head predicts from one block by block. ``temperature_``
    (1 after `fit`; fuse sets it from val, `pipeline.calibration`) calibrates its
    probabilities wherever it runs: `predict_proba` and `torch_module` apply it.
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
        self.temperature_ = 1.0
        self._check_block_dims(X.shape[1])
        self._fit(X, y_idx, self._validation(X_val, y_val))
        return self

    def predict_proba(self, X, *, calibrated: bool = True) -> np.ndarray:
        """Class probabilities (n_samples, n_classes), columns in ``classes_`` order, through
        the head's temperature unless not ``calibrated`` (the predicted class is the same)."""
        check_is_fitted(self, "classes_")
        X = self._check_x(X, "X")
        self._check_width(X, "X")
        if isinstance(X, LazyRows):
            blocks = [self.predict_proba(X[rows], calibrated=calibrated) for rows in row_blocks(X)]
            return np.concatenate(blocks)
        proba = self._proba(X).astype(np.float64)
        proba /= proba.sum(axis=1, keepdims=True)  # float32 models sum to 1 +- 1e-7
        return tempered(proba, self.temperature_) if calibrated else proba

    def predict(self, X) -> np.ndarray:
        """Predicted labels (n_samples,), taken from ``classes_``."""
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def refit_params(self) -> dict[str, Any]:
        """Params that repeat, without validation data, what validation chose in this fit
        (the MLP's best epoch); used to refit on train + val."""
        return {}

    def torch_module(self) -> torch.nn.Module:
        """`predict_proba` as a torch module, (n, n_features_in_) float32 -> (n, n_classes)
        calibrated probabilities, for the ONNX export."""
        module = self._torch_module()
        if self.temperature_ == 1.0:
            return module
        return torch.nn.Sequential(module, _Tempered(self.temperature_))

    def _torch_module(self) -> torch.nn.Module:
        """The head's probabilities before its temperature in torch; each head brings its own."""
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

    def _array_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every array `_arrays` gives, from the params, ``n_features_in_`` and
        ``classes_`` alone: what a loaded head.safetensors must hold, exactly."""
        return {}

    def _check_fitted_json(self) -> None:
        """ValueError when the learned JSON state (``_fitted_json``) of a loaded head does
        not fit its width and classes."""

    def _validate_params(self) -> None:
        for param, (ok, allowed) in self._constraints.items():
            value = getattr(self, param)
            if not ok(value):
                raise ConfigError(
                    f"The {param!r} parameter of {self.name} must be {allowed}. "
                    f"Got {value!r} instead."
                )

    def _validation(self, X_val, y_val) -> tuple | None:
        """(X_val, y_val as indices into ``classes_``), checked; None without them."""
        if (X_val is None) != (y_val is None):
            raise ConfigError(f"{self.name}: give both X_val and y_val, or neither.")
        if X_val is None:
            return None
        X_val, y_val = self._check_xy(X_val, y_val, "X_val", "y_val")
        self._check_width(X_val, "X_val")
        unseen = sorted(set(np.unique(y_val).tolist()) - set(self.classes_.tolist()))
        if unseen:
            raise DataError(f"{self.name}: y_val holds label(s) {unseen} absent from y.")
        return X_val, np.searchsorted(self.classes_, y_val)

    def _check_block_dims(self, width: int) -> None:
        dims = getattr(self, "block_dims", None)
        if dims is not None and sum(dims) != width:
            raise DataError(
                f"{self.name}: block_dims {list(dims)} add up to {sum(dims)} features, "
                f"but X has {width}."
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


class _Tempered(torch.nn.Module):
    """`pipeline.calibration.tempered` in torch: probabilities -> through a temperature."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, proba: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.log(proba.clamp_min(EPS)) / self.temperature, dim=1)
