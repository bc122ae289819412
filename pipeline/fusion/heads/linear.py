"""Linear heads: block treatment, then a scikit-learn linear model whose coefficients alone
are kept (logistic regression, ridge classifier)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from torch import nn

from pipeline.fusion.heads.base import (
    BLOCK_NORM,
    BOOL,
    DIMS,
    INT_GE1,
    POSITIVE,
    Head,
    register_head,
)
from pipeline.fusion.heads.scaling import BlockScaler

LINEAR_CONSTRAINTS = {"class_weighted": BOOL, "block_norm": BLOCK_NORM, "block_dims": DIMS}


class _LinearHead(Head):
    """Block treatment (fitted on the training X only), then a linear scikit-learn model.

    Only the model's coefficients are kept (``coef_`` (n_classes, D), or (1, D) for two
    classes, and ``intercept_``), so the head saves as plain arrays; `_scores_to_proba`
    turns its scores into probabilities the way the scikit-learn model does.
    """

    # two classes: the model's one score column s as the softmax inputs s @ _binary_map
    _binary_map: ClassVar[np.ndarray]

    def _estimator(self):
        raise NotImplementedError

    def _score_map(self) -> np.ndarray:
        """(n_score_columns, n_classes): the softmax inputs as a linear map of the scores."""
        return self._binary_map if len(self.coef_) == 1 else np.eye(len(self.coef_))

    def _scores_to_proba(self, scores: np.ndarray) -> np.ndarray:
        return softmax(scores @ self._score_map(), axis=1)

    def _fit(self, X, y, val):
        self.scaler_ = BlockScaler(self.block_norm, self.block_dims).partial_fit(X)
        model = self._estimator().fit(self.scaler_.transform(X), y)
        # (1, D) for two classes: a binary RidgeClassifier keeps a flat (D,) coef_
        self.coef_, self.intercept_ = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)

    def _proba(self, X):
        return self._scores_to_proba(self.scaler_.transform(X) @ self.coef_.T + self.intercept_)

    def _torch_module(self) -> nn.Module:
        M = self._score_map()  # folded into the linear layer: one Linear, then softmax
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

    def _array_shapes(self):
        rows = 1 if len(self.classes_) == 2 else len(self.classes_)  # as scikit-learn keeps them
        dim = self.n_features_in_
        scaler = BlockScaler(self.block_norm, self.block_dims).array_shapes(dim)
        return {"coef": (rows, dim), "intercept": (rows,)} | scaler


@register_head("logreg")
class LogRegHead(_LinearHead):
    """Multinomial logistic regression; lbfgs, deterministic (no random state)."""

    _constraints: ClassVar = {"C": POSITIVE, "max_iter": INT_GE1, **LINEAR_CONSTRAINTS}
    _binary_map: ClassVar = np.array([[0.0, 1.0]])  # one logit, for the second class

    def __init__(self, *, C, max_iter, class_weighted, block_norm, block_dims):
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


@register_head("ridge")
class RidgeHead(_LinearHead):
    """Ridge classifier; probabilities are the softmax of its decision function."""

    _constraints: ClassVar = {"alpha": POSITIVE, **LINEAR_CONSTRAINTS}
    _binary_map: ClassVar = np.array([[-1.0, 1.0]])  # the margin m scores the classes -m and m

    def __init__(self, *, alpha, class_weighted, block_norm, block_dims):
        self.alpha = alpha
        self.class_weighted = class_weighted
        self.block_norm = block_norm
        self.block_dims = block_dims

    def _estimator(self):
        return RidgeClassifier(
            alpha=self.alpha, class_weight="balanced" if self.class_weighted else None
        )
