"""Training helpers shared by fine-tuning and the torch fusion heads: the learning-rate
schedule and the class weights of the loss, one definition each."""

from __future__ import annotations

import math

import numpy as np


def cosine_lr(step: int, last_step: int, lr: float, lr_final: float) -> float:
    """Cosine decay: ``lr`` at step 0, ``lr_final`` from ``last_step`` on."""
    frac = min(step / max(last_step, 1), 1.0)
    return lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * frac))


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes,) inverse-frequency weights n / (n_classes * count), as scikit-learn's
    "balanced": mean 1 over the samples, so the loss keeps its scale; 0 for an absent class."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
