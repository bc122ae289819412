"""Temperatures fitted on val, the calibration measures, and what a review rate buys."""

import numpy as np
import pytest
from scipy.special import softmax

from pipeline.calibration import (
    BOUNDS,
    calibration_error,
    fit_temperature,
    log_loss,
    reliability,
    tempered,
)
from pipeline.report.decisions import calibration, review_table, risk_coverage


def _overconfident(n=4000, true_temperature=2.5, seed=0):
    """Softmax probabilities of logits whose labels were drawn at ``true_temperature``:
    a model as sure as its logits say, though it should be that much less."""
    rng = np.random.default_rng(seed)
    logits = 3 * rng.normal(size=(n, 3))
    truth = softmax(logits / true_temperature, axis=1)
    y = np.array([rng.choice(3, p=p) for p in truth])
    return softmax(logits, axis=1), y


def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at():
    proba, y = _overconfident()
    temperature = fit_temperature(proba, y)
    assert temperature == pytest.approx(2.5, rel=0.1)
    after = tempered(proba, temperature)
    assert log_loss(after, y) < log_loss(proba, y)
    assert calibration_error(after, y) < 0.03 < calibration_error(proba, y)
    np.testing.assert_array_equal(after.argmax(1), proba.argmax(1))  # the answers stay


def test_tempered_is_a_softmax_of_logits_over_t_and_one_leaves_it_alone():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    proba = softmax(logits, axis=1)
    np.testing.assert_allclose(tempered(proba, 2.0), softmax(logits / 2.0, axis=1))
    assert tempered(proba, 1.0) is proba


def test_fit_temperature_stays_within_its_bounds_on_separable_val_rows():
    proba = np.array([[0.9, 0.1], [0.2, 0.8]] * 10)  # always right: sharper is always better
    assert fit_temperature(proba, np.array([0, 1] * 10)) == pytest.approx(BOUNDS[0], rel=1e-3)


def test_calibration_error_and_reliability_on_a_hand_counted_example():
    proba = np.array([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])  # bin 0.93-1.0: 2 rows, 1 right; bin 0.6-0.67: 2 rows, 2 right
    bins = reliability(proba, y)
    assert [(b["n"], b["accuracy"]) for b in bins] == [(2, 1.0), (2, 0.5)]
    assert calibration_error(proba, y) == pytest.approx((2 * 0.4 + 2 * 0.45) / 4)
    assert log_loss(proba, y) == pytest.approx(-np.log([0.95, 0.05, 0.6, 0.6]).mean())


def _result(sure, pred, true, temperature=1.0):
    proba = np.zeros((len(sure), 2))
    proba[np.arange(len(sure)), pred] = sure
    proba[np.arange(len(sure)), 1 - np.asarray(pred)] = 1 - np.asarray(sure)
    return {
        "y_true": np.asarray(true),
        "y_pred": np.asarray(pred),
        "p_pred": np.asarray(sure),
        "proba": proba,
        "proba_raw": proba,
        "temperature": temperature,
    }


def test_review_table_sends_the_least_sure_to_review_and_counts_defects_passed_as_good():
    # class 0 good, class 1 defective; the two least sure answers are the wrong ones
    result = _result(
        sure=[0.55, 0.99, 0.6, 0.9, 0.95, 0.97, 0.8, 0.85, 0.92, 0.98],
        pred=[0, 0, 0, 1, 1, 0, 1, 0, 1, 1],
        true=[1, 0, 1, 1, 1, 0, 1, 0, 1, 1],
    )
    rows = review_table(result, (0.0, 0.1, 0.2), np.array([False, True]))
    assert [r["reviewed"] for r in rows] == [0, 1, 2]
    assert [r["accuracy_kept"] for r in rows] == [0.8, pytest.approx(8 / 9, abs=1e-6), 1.0]
    assert [r["defective_passed"] for r in rows] == [2, 1, 0]
    assert rows[0]["defective_passed_rate"] == pytest.approx(2 / 7, abs=1e-6)
    assert [r["review_below"] for r in rows] == [0.55, 0.6, 0.8]  # `--review-below` flags < P
    assert "defective_passed" not in review_table(result, (0.0,), None)[0]
    reviewed, accuracy = risk_coverage(result)
    assert reviewed[:3].tolist() == [0.0, 0.1, 0.2] and accuracy[:3].tolist() == [
        rows[0]["accuracy_kept"],
        pytest.approx(8 / 9),
        1.0,
    ]


def test_calibration_reports_before_and_after_its_temperature():
    proba, y = _overconfident(n=500)
    temperature = fit_temperature(proba, y)
    result = _result([0.5] * len(y), [0] * len(y), y) | {
        "y_true": y,
        "proba_raw": proba,
        "proba": tempered(proba, temperature),
        "temperature": temperature,
    }
    table = calibration(result)
    assert table["log_loss"][1] < table["log_loss"][0] and table["ece"][1] < table["ece"][0]
    assert table["temperature"] == round(temperature, 6)
