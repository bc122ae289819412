"""compare(): one row per (head, subset), test rows kept out of CV, reports written."""

import csv

import numpy as np
import pytest
from conftest import full_params, head_entry

from pipeline.errors import ConfigError, DataError
from pipeline.fusion.compare import compare as run_compare
from pipeline.fusion.heads import HEADS, Head

N_CLASSES = 3
HEADS_FAST = {
    "logreg": head_entry("logreg", C=1.0),
    "ridge": head_entry("ridge", alpha=1.0),
    "late": {},
    "mlp": head_entry("mlp", epochs=10, hidden=16, lr=1e-2, weight_decay=0.0),
}


def compare(blocks, y, split, heads, **given):
    """`compare` with the params.yaml values (`compare` and `fuse` sections) not ``given``."""
    params = full_params()
    fuse, own = params["fuse"], params["compare"]
    kwargs = {
        "logit_blocks": None,
        "class_names": None,
        "folds": own["folds"],
        "min_subset": own["min_subset"],
        "seed": own["seed"],
        "n_jobs": 1,
        "block_norm": fuse["block_norm"],
        "select_by": fuse["select_by"],
        "refit": fuse["refit"],
        "progress": False,
    }
    return run_compare(blocks, y, split, heads, **(kwargs | given))


def _data(n=150, seed=0):
    """'good' separates the classes, 'weak' a little, 'noise' not at all; 30 test rows."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % N_CLASSES
    split = np.array(["train", "train", "val", "train", "val"] * (n // 5))  # every class in each
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
    heads = HEADS_FAST | {"logreg": head_entry("logreg", C=[0.01, 1.0])}  # a grid, per fold
    board = compare(blocks, y, split, heads, folds=3, logit_blocks=logits)
    assert len(board.rows) == len(heads) * 7
    assert {(r["head"], r["backbones"]) for r in board.rows} >= {("late", ("good",))}
    f1 = [r["cv_f1_macro_mean"] for r in board.rows]
    assert f1 == sorted(f1, reverse=True)
    assert "good" in board.pick["backbones"] and board.pick["test"]["n"] == 30
    assert board.pick["test"]["accuracy"] > 0.8
    assert board.rows[-1]["backbones"] in {("noise",), ("weak",), ("weak", "noise")}

    text = board.to_markdown()
    assert "3-fold nested CV on the 48 val rows" in text and "test only for the pick" in text
    assert "### Best subset per head" in text and "### Which models should be fused" in text
    with board.to_csv(tmp_path / "board.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(board.rows) and table[0]["head"] == board.pick["head"]


def test_parallel_fits_rank_as_serial_ones():
    blocks, y, split, logits = _data()
    heads = {"logreg": head_entry("logreg", C=[0.01, 1.0]), "late": {}}
    serial = compare(blocks, y, split, heads, folds=3, logit_blocks=logits)
    parallel = compare(blocks, y, split, heads, folds=3, logit_blocks=logits, n_jobs=2)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]  # noqa: E731
    assert strip(parallel.rows) == strip(serial.rows)
    assert parallel.pick["test"] == serial.pick["test"]


def test_min_subset_and_logits_required():
    blocks, y, split, _ = _data()
    board = compare(blocks, y, split, {"ridge": HEADS_FAST["ridge"]}, folds=2, min_subset=2)
    assert sorted(r["n_backbones"] for r in board.rows) == [2, 2, 2, 3]
    with pytest.raises(ConfigError, match="logit_blocks"):
        compare(blocks, y, split, {"late": {}})
    with pytest.raises(ConfigError, match="Unknown parameter"):
        compare(blocks, y, split, {"ridge": {"C": 1.0}})
    with pytest.raises(ConfigError, match=r"Head 'ridge' lacks parameter\(s\) \['alpha'\]"):
        compare(blocks, y, split, {"ridge": {"class_weighted": False}})


def test_fewer_val_rows_of_a_class_than_folds_is_one_line():
    blocks, y, split, _ = _data()
    val_b = np.flatnonzero((split == "val") & (y == 1))
    split[val_b[3:]] = "train"  # class 1 keeps 3 val rows
    with pytest.raises(DataError) as err:
        compare(blocks, y, split, {"ridge": HEADS_FAST["ridge"]}, folds=4, class_names=list("abc"))
    assert str(err.value).count("\n") == 0
    assert "at least 4 val rows of every class" in str(err.value)
    assert "class 'b' has 3 val row(s)" in str(err.value) and "'a': 16" in str(err.value)


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
    compare({"ids": ids}, y, split, {"spy": {}}, folds=4)
    train, val = set(np.flatnonzero(split == "train")), set(np.flatnonzero(split == "val"))
    test = set(np.flatnonzero(split == "test"))
    (_, fit), (_, graded), (_, refit), (_, final) = CALLS
    assert fit == train and graded == val  # ranked on val rows: the backbones never saw them
    assert refit == train | val and final == test
