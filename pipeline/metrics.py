"""Classification metrics as plain JSON, and the atomic JSON writer DVC metrics files need."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from pipeline.errors import DataError
from pipeline.storage.atomic import write_text

DECIMALS = 6  # stable JSON: float noise below this would show as a DVC metrics change


def classification_metrics(y_true, y_pred, class_names) -> dict[str, Any]:
    """Accuracy, macro and weighted precision / recall / F1, per class, confusion matrix.

    ``y_true``, ``y_pred``: (n_samples,) int labels in [0, len(class_names)). Every class
    appears in the output, present or not (absent classes score 0). The confusion matrix
    is (n_classes, n_classes), rows = true, columns = predicted.
    """
    y_true, y_pred, names = np.asarray(y_true), np.asarray(y_pred), [str(c) for c in class_names]
    labels = list(range(len(names)))
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise DataError(
            f"y_true and y_pred must be 1-D, non-empty and of equal length. "
            f"Got shapes {y_true.shape} and {y_pred.shape}."
        )
    outside = sorted(set(np.unique(np.concatenate([y_true, y_pred])).tolist()) - set(labels))
    if outside:
        raise DataError(
            f"Labels {outside} are outside 0..{len(names) - 1} ({len(names)} class names)."
        )
    out: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": _round(accuracy_score(y_true, y_pred)),
        "class_names": names,
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        out |= {
            f"precision_{average}": _round(p),
            f"recall_{average}": _round(r),
            f"f1_{average}": _round(f),
        }
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    out["per_class"] = {
        name: {
            "precision": _round(p[i]),
            "recall": _round(r[i]),
            "f1": _round(f[i]),
            "support": int(s[i]),
        }
        for i, name in enumerate(names)
    }
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def _round(x) -> float:
    return round(float(x), DECIMALS)


def write_json(path: Path | str, obj: Any) -> Path:
    """Write ``obj`` as indented JSON with sorted keys and a trailing newline, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"  # fails before any file is touched
    return write_text(path, text)
