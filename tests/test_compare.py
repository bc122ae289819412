"""compare(): one row per (head, subset), test rows kept out of CV, reports written."""

import csv

import numpy as np
import pytest

from pipeline.compare import compare
from pipeline.errors import ConfigError
from pipeline.heads import HEADS, Head

N_CLASSES = 3
HEADS_FAST = {
    "logreg": {},
    "ridge": {},
    "late": {},
    "mlp": {"epochs": 10, "hidden": 16, "lr": 1e-2},
}


def _data(n=150, seed=0):
    """'good' separates the classes, 'weak' a little, 'noise' not at all; 30 test rows."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % N_CLASSES
    split = np.array(["train", "train", "val"] * (n // 3))
    split[-30:] = "test"
    onehot = np.eye(N_CLASSES)[y]
    blocks = {
        "good": rng.normal(size=(n, 4)) + 3 * np.pad(onehot, ((0, 0), (0, 1))),
        "weak": rng.normal(size=(n, 4)) + 0.5 * np.pad(onehot, ((0, 0), (0, 1))),
        "noise": rng.normal(size=(n, 4)),
    }
    logits = {name: rng.normal(size=(n, N_CLASSES)) for name in blocks}
    logits["good"] += 4 * onehot
    return blocks, y, split, logits


def test_rows_ranking_pick_and_reports(tmp_path):
    blocks, y, split, logits = _data()
    board = compare(blocks, y, split, HEADS_FAST, folds=3, logit_blocks=logits, progress=False)
    assert len(board.rows) == len(HEADS_FAST) * 7
    assert {(r["head"], r["backbones"]) for r in board.rows} >= {("late", ("good",))}
    f1 = [r["cv_f1_macro_mean"] for r in board.rows]
    assert f1 == sorted(f1, reverse=True)
    assert "good" in board.pick["backbones"] and board.pick["test"]["n"] == 30
    assert board.pick["test"]["accuracy"] > 0.8
    assert board.rows[-1]["backbones"] in {("noise",), ("weak",), ("weak", "noise")}

    text = board.to_markdown()
    assert "3-fold stratified CV on train+val (120 rows); test only for the pick" in text
    assert "### Best subset per head" in text and "### Which models should be fused" in text
    with board.to_csv(tmp_path / "board.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(board.rows) and table[0]["head"] == board.pick["head"]


def test_min_subset_and_logits_required():
    blocks, y, split, _ = _data()
    board = compare(blocks, y, split, {"ridge": {}}, folds=2, min_subset=2, progress=False)
    assert sorted(r["n_backbones"] for r in board.rows) == [2, 2, 2, 3]
    with pytest.raises(ConfigError, match="logit_blocks"):
        compare(blocks, y, split, {"late": {}}, progress=False)
    with pytest.raises(ConfigError, match="Unknown parameter"):
        compare(blocks, y, split, {"ridge": {"C": 1.0}}, progress=False)


CALLS = []


class _SpyHead(Head):
    """Records the row ids (column 0) it is fitted on and asked about."""

    name = "spy"

    def _fit(self, X, y, val):
        CALLS.append(("fit", set(X[:, 0].astype(int))))

    def _proba(self, X):
        CALLS.append(("predict", set(X[:, 0].astype(int))))
        return np.full((len(X), len(self.classes_)), 1 / len(self.classes_))


def test_test_rows_only_reach_the_final_evaluation(monkeypatch):
    _, y, split, _ = _data()
    monkeypatch.setitem(HEADS, "spy", _SpyHead)
    CALLS.clear()
    ids = np.arange(len(y), dtype=float)[:, None]
    compare({"ids": ids}, y, split, {"spy": {}}, folds=4, progress=False)
    test, dev = set(np.flatnonzero(split == "test")), set(np.flatnonzero(split != "test"))
    *cv_calls, (_, refit), (_, final) = CALLS
    assert len(cv_calls) == 8 and all(not rows & test for _, rows in cv_calls)
    assert set().union(*(rows for kind, rows in cv_calls if kind == "predict")) == dev
    assert refit == dev and final == test
