"""Per-backbone block treatment of fused rows, fitted on training rows: what makes a
4096-d block and a 1280-d one, at different activation scales, weigh the same."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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

    def array_shapes(self, width: int) -> dict[str, tuple[int, ...]]:
        """The shape of each array `arrays` gives, for rows of ``width`` features."""
        if self.norm == "none":
            return {}
        return {f"{self.PREFIX}mean": (width,), f"{self.PREFIX}scale": (width,)}

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
