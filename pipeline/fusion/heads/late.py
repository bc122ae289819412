"""Score-level fusion: the fine-tuned classifiers' own probabilities, averaged."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from scipy.special import softmax
from torch import nn

from pipeline.errors import DataError
from pipeline.fusion.heads.base import Head, register_head


@register_head("late")
class LateFusionHead(Head):
    """The mean over K models of softmax(each model's logits).

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

    def _torch_module(self) -> nn.Module:
        return _MeanSoftmax(self.n_models_, len(self.classes_))

    def _proba(self, X):
        blocks = X.astype(np.float64).reshape(len(X), self.n_models_, len(self.classes_))
        return softmax(blocks, axis=2).mean(axis=1)

    def _check_fitted_json(self):
        k = self.n_models_
        if not isinstance(k, int) or k < 1 or k * len(self.classes_) != self.n_features_in_:
            raise ValueError(
                f"n_models_ {k!r} x {len(self.classes_)} classes must equal its "
                f"{self.n_features_in_} input columns"
            )


class _MeanSoftmax(nn.Module):
    """LateFusionHead in torch: (n, K * C) logits -> mean over K of each block's softmax."""

    def __init__(self, n_models: int, n_classes: int):
        super().__init__()
        self.n_models, self.n_classes = n_models, n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(-1, self.n_models, self.n_classes)
        return torch.softmax(blocks, dim=2).mean(dim=1)
