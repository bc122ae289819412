"""Paired bootstrap and McNemar against scikit-learn and SciPy on small label arrays."""

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score

from pipeline.errors import DataError
from pipeline.report.stats import macro_f1, paired_comparison


def test_macro_f1_matches_sklearn_per_draw():
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 4, (50, 30)), rng.integers(0, 4, (50, 30))
    pred[3] = 0  # a draw that never predicts three of the classes
    expected = [
        f1_score(t, p, labels=range(5), average="macro", zero_division=0)
        for t, p in zip(y, pred, strict=True)
    ]
    np.testing.assert_allclose(macro_f1(y, pred, 5), expected, atol=1e-12)


def test_paired_comparison_intervals_and_mcnemar():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    b = np.where(rng.random(400) < 0.7, y, (y + 1) % 3)  # right on ~70 %
    a = np.where(rng.random(400) < 0.5, y, b)  # fixes about half of b's errors
    cmp = paired_comparison(y, a, b, 3, draws=2000, seed=0)
    assert cmp.accuracy_diff == pytest.approx((a == y).mean() - (b == y).mean())
    lo, hi = cmp.accuracy_ci
    assert 0 < lo < cmp.accuracy_diff < hi
    assert cmp.f1_macro_ci[0] < cmp.f1_macro_diff < cmp.f1_macro_ci[1]
    only_a, only_b = ((a == y) & (b != y)).sum(), ((b == y) & (a != y)).sum()
    assert (cmp.only_a_right, cmp.only_b_right) == (only_a, only_b) and only_b == 0
    assert cmp.mcnemar_p == pytest.approx(binomtest(only_a, only_a + only_b).pvalue)
    assert cmp.mcnemar_p < 1e-6
    assert paired_comparison(y, a, b, 3, draws=2000, seed=0) == cmp  # seeded
    assert paired_comparison(y, a, b, 3, draws=2000, seed=1).accuracy_ci != cmp.accuracy_ci


def test_identical_predictions_show_no_difference():
    y = np.array([0, 1, 2, 1, 0])
    cmp = paired_comparison(y, y[::-1], y[::-1], 3, draws=100)
    assert cmp.accuracy_diff == 0 and cmp.accuracy_ci == (0.0, 0.0) and cmp.mcnemar_p == 1.0


def test_misaligned_labels_are_named():
    with pytest.raises(DataError, match=r"shapes \(3,\), \(2,\), \(3,\)"):
        paired_comparison([0, 1, 1], [0, 1], [0, 1, 0], 2)
