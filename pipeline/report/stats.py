"""Is a head better than a model, or just luckier? Paired tests on the same test images."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest

from pipeline.errors import DataError


@dataclass(frozen=True)
class PairedComparison:
    """``a`` against ``b`` on the same images: differences a - b with 95 % intervals."""

    n: int
    draws: int
    accuracy_diff: float
    accuracy_ci: tuple[float, float]
    f1_macro_diff: float
    f1_macro_ci: tuple[float, float]
    only_a_right: int  # McNemar's discordant pairs
    only_b_right: int
    mcnemar_p: float  # exact two-sided p-value for equal accuracy

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro F1 of each row of (n_draws, n) label arrays; (n_draws,). Absent classes score 0,
    as in `classification_metrics` (scikit-learn's ``zero_division=0``)."""
    y_true, y_pred = np.atleast_2d(y_true), np.atleast_2d(y_pred)
    offset = np.arange(len(y_true))[:, None] * n_classes  # one block of counts per draw
    shape, size = (len(y_true), n_classes), len(y_true) * n_classes
    tp = np.bincount((offset + y_true)[y_true == y_pred], minlength=size).reshape(shape)
    true_count = np.bincount((offset + y_true).ravel(), minlength=size).reshape(shape)
    pred_count = np.bincount((offset + y_pred).ravel(), minlength=size).reshape(shape)
    denom = true_count + pred_count  # F1 = 2 TP / (true + predicted)
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(shape), where=denom > 0)
    return f1.mean(axis=1)


def paired_comparison(
    y_true, pred_a, pred_b, n_classes: int, draws: int = 10_000, seed: int = 0
) -> PairedComparison:
    """Paired bootstrap (resampling test images, ``draws`` times, seeded) of the accuracy and
    macro-F1 differences ``a - b``, with percentile 95 % intervals, and McNemar's exact test.

    ``y_true``, ``pred_a``, ``pred_b``: (n_samples,) int labels in [0, n_classes).
    """
    y, a, b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    if not (y.ndim == 1 and y.shape == a.shape == b.shape and len(y)):
        raise DataError(
            f"paired_comparison needs three aligned, non-empty 1-D label arrays. "
            f"Got shapes {y.shape}, {a.shape}, {b.shape}."
        )
    if draws < 1:
        raise DataError(f"draws must be >= 1. Got {draws!r}.")
    rng = np.random.default_rng(seed)
    acc, f1 = np.empty(draws), np.empty(draws)
    right_a, right_b = a == y, b == y
    for start in range(0, draws, 1000):  # 1,000 draws at a time bound the memory
        idx = rng.integers(0, len(y), (min(1000, draws - start), len(y)))
        part = slice(start, start + len(idx))
        acc[part] = right_a[idx].mean(axis=1) - right_b[idx].mean(axis=1)
        f1[part] = macro_f1(y[idx], a[idx], n_classes) - macro_f1(y[idx], b[idx], n_classes)
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    p = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    return PairedComparison(
        n=len(y),
        draws=draws,
        accuracy_diff=float(right_a.mean() - right_b.mean()),
        accuracy_ci=_interval(acc),
        f1_macro_diff=float(macro_f1(y, a, n_classes)[0] - macro_f1(y, b, n_classes)[0]),
        f1_macro_ci=_interval(f1),
        only_a_right=only_a,
        only_b_right=only_b,
        mcnemar_p=float(p),
    )


def _interval(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)
