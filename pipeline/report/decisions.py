"""What the probabilities are worth to an inspector, on the test split: how well calibrated
each model is before and after its temperature, and what sending the least sure answers to
a person buys (the risk-coverage curve, and defective parts passed as good)."""

from __future__ import annotations

import numpy as np

from pipeline.calibration import calibration_error, log_loss


def calibration(result: dict) -> dict:
    """Test log loss and expected calibration error of one model's probabilities
    (`pipeline.fusion.fit.evaluate`'s result) before and after its temperature."""
    y = result["y_true"]
    return {
        "temperature": round(result["temperature"], 6),
        "log_loss": [round(log_loss(result[k], y), 6) for k in ("proba_raw", "proba")],
        "ece": [round(calibration_error(result[k], y), 6) for k in ("proba_raw", "proba")],
    }


def risk_coverage(result: dict) -> tuple[np.ndarray, np.ndarray]:
    """(fraction reviewed, accuracy on the images kept) for 0, 1, ... n - 1 images sent to
    review, the least sure first (calibrated top probability)."""
    order = np.argsort(result["p_pred"], kind="stable")
    right = (result["y_pred"] == result["y_true"])[order]
    kept = np.arange(len(right), 0, -1)  # rows kept after reviewing the first k
    accuracy = np.cumsum(right[::-1])[::-1] / kept
    return np.arange(len(right)) / len(right), accuracy


def review_table(result: dict, rates: tuple[float, ...], defective: np.ndarray | None) -> list:
    """One row per review rate r: the floor(r n) least sure test images go to a person.
    Each row gives the top probability below which `--review-below` flags them (the least
    sure kept image's), the accuracy on the images kept and, with ``defective`` (a bool per
    class: not a defect-free class), the defective parts that pass as good: kept, and
    predicted a defect-free class; a share of all defective test parts."""
    y, pred, sure = result["y_true"], result["y_pred"], result["p_pred"]
    order = np.argsort(sure, kind="stable")
    rows = []
    for rate in rates:
        kept = order[int(rate * len(y)) :]
        row = {
            "rate": rate,
            "reviewed": len(y) - len(kept),
            "review_below": round(float(sure[kept[0]]), 6),
            "accuracy_kept": round(float((pred[kept] == y[kept]).mean()), 6),
        }
        if defective is not None:
            passed = defective[y[kept]] & ~defective[pred[kept]]
            row["defective_passed"] = int(passed.sum())
            share = passed.sum() / max(int(defective[y].sum()), 1)  # 0 without defective parts
            row["defective_passed_rate"] = round(float(share), 6)
        rows.append(row)
    return rows
