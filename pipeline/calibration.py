"""How far a model's probabilities can be trusted, and one scalar that repairs most of it.

A temperature T divides a model's log-probabilities before they are renormalised: the
softmax of logits / T for a softmax model, so the predicted class never changes, only how
sure the model says it is. It is fitted on val by log loss (Guo et al., 2017), one per
model, and measured on test by the log loss and the expected calibration error (ECE: the
gap between confidence and accuracy, averaged over confidence bins). numpy and scipy only.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

EPS = 1e-12  # a probability of 0 is read as this before its log is taken
BOUNDS = (0.05, 20.0)  # temperatures searched: from 20x sharper to 20x flatter
BINS = 15  # equal-width confidence bins of the ECE and the reliability diagram


def tempered(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``proba`` (n, C) with its log divided by ``temperature``, renormalised; unchanged
    when the temperature is 1."""
    if temperature == 1.0:
        return proba
    return softmax(np.log(np.clip(proba, EPS, 1.0)) / temperature, axis=1)


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The temperature within BOUNDS that minimises the log loss of `tempered` ``proba``
    (n, C) against labels ``y`` (n,), column indices: val rows the model did not learn from."""
    logp = np.log(np.clip(np.asarray(proba, dtype=np.float64), EPS, 1.0))
    rows = np.arange(len(y))

    def loss(log_t: float) -> float:
        return -float(log_softmax(logp / np.exp(log_t), axis=1)[rows, y].mean())

    # the log loss is convex in 1 / T, so one minimum: a bounded scalar search finds it
    found = minimize_scalar(loss, bounds=np.log(BOUNDS), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))


def log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-probability of the true class (nats); lower is better."""
    return -float(np.log(np.clip(proba[np.arange(len(y)), y], EPS, 1.0)).mean())


def reliability(proba: np.ndarray, y: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per equal-width bin of the top probability (confidence): its range, the number of
    rows in it, their mean confidence and their accuracy; empty bins are left out."""
    confidence, right = proba.max(axis=1), proba.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    out = []
    for b in np.unique(which):
        rows = which == b
        out.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "n": int(rows.sum()),
                "confidence": float(confidence[rows].mean()),
                "accuracy": float(right[rows].mean()),
            }
        )
    return out


def calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: |accuracy - confidence| of each `reliability` bin,
    weighted by its share of the rows; 0 is perfectly calibrated."""
    return sum(
        b["n"] * abs(b["accuracy"] - b["confidence"]) for b in reliability(proba, y, bins)
    ) / len(y)
