"""Which heads on which backbone subsets, ranked on rows the backbones never trained on.

Every (head, subset) is fitted as `defuse fuse` fits it: its candidates on train, the same
block treatment and epoch selection. Its score is nested over k folds of the val rows: the
candidate chosen on the other folds is scored on each fold, so no row both picks and
grades. Test rows are read once, by the refitted pick.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold

from pipeline.errors import ConfigError, DataError
from pipeline.fusion.heads import HEADS, by_input
from pipeline.fusion.selection import (
    accepted_params,
    candidate_params,
    choose,
    fit_many,
    rank_key,
)
from pipeline.metrics import classification_metrics
from pipeline.progress import Progress

COLUMNS = (
    "head",
    "backbones",
    "n_backbones",
    "dim",
    "cv_accuracy_mean",
    "cv_accuracy_std",
    "cv_f1_macro_mean",
    "cv_f1_macro_std",
    "fit_seconds",
)


@dataclass
class Leaderboard:
    """CV rows ranked best first, and the pick: the top row refitted, with its test metrics."""

    rows: list[dict[str, Any]]
    pick: dict[str, Any]  # the top row + "test": classification_metrics on the test rows
    folds: int
    n_cv: int  # val rows the folds were drawn from

    def to_csv(self, path: Path | str) -> Path:
        """One line per (head, subset), ranked; backbones joined by '+'."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({**row, "backbones": "+".join(row["backbones"])})
        return path

    def to_markdown(self) -> str:
        """The leaderboard, the best subset per head, and which models to fuse."""
        lines = [
            "## Fusion heads x backbone subsets",
            "",
            f"Heads fitted on train as `defuse fuse` fits them; scored by {self.folds}-fold "
            f"nested CV on the {self.n_cv} val rows, which no backbone trained on (each fold "
            "scores the candidate chosen on the other folds); test only for the pick. "
            "Mean ± std over folds.",
            "",
            "| rank | head | backbones | dim | CV macro-F1 | CV accuracy | fit s (all candidates) |",
            "|---:|---|---|---:|---|---|---:|",
        ]
        for rank, r in enumerate(self.rows, 1):
            lines.append(
                f"| {rank} | {r['head']} | {_names(r)} | {r['dim']} | {_f1(r)} | {_acc(r)} "
                f"| {r['fit_seconds']:.2f} |"
            )
        lines += ["", "### Best subset per head", "", "| head | backbones | CV macro-F1 |"]
        lines.append("|---|---|---|")
        for r in _best_by(self.rows, "head"):
            lines.append(f"| {r['head']} | {_names(r)} | {_f1(r)} |")
        lines += [
            "",
            "### Which models should be fused",
            "",
            "Backbone subsets ranked by their best head's CV macro-F1.",
            "",
            "| subset | best head | CV macro-F1 | CV accuracy |",
            "|---|---|---|---|",
        ]
        for r in _best_by(self.rows, "backbones"):
            lines.append(f"| {_names(r)} | {r['head']} | {_f1(r)} | {_acc(r)} |")
        p, test = self.pick, self.pick.get("test")
        lines += ["", "### Pick", "", f"**{p['head']}** on **{_names(p)}** (CV macro-F1 {_f1(p)})."]
        if test:
            lines.append(
                f"Test ({test['n']} rows): accuracy {test['accuracy']:.4f}, "
                f"macro-F1 {test['f1_macro']:.4f}, weighted F1 {test['f1_weighted']:.4f}."
            )
        else:
            lines.append("No test rows: the pick has no test figures.")
        return "\n".join(lines) + "\n"


def _names(row) -> str:
    return " + ".join(row["backbones"])


def _f1(row) -> str:
    return f"{row['cv_f1_macro_mean']:.4f} ± {row['cv_f1_macro_std']:.4f}"


def _acc(row) -> str:
    return f"{row['cv_accuracy_mean']:.4f} ± {row['cv_accuracy_std']:.4f}"


def _best_by(rows: list[dict], key: str) -> list[dict]:
    """The first (best-ranked) row for each distinct ``key``, in rank order."""
    seen: dict = {}
    for row in rows:
        seen.setdefault(row[key], row)
    return list(seen.values())


def _rank_key(row) -> tuple:
    return (-row["cv_f1_macro_mean"], -row["cv_accuracy_mean"], row["n_backbones"])


def compare(
    blocks: dict[str, np.ndarray],
    y,
    split,
    heads: dict[str, dict],
    *,
    logit_blocks: dict[str, np.ndarray] | None,
    class_names: list[str] | None,
    folds: int,
    min_subset: int,
    seed: int,
    block_norm: str,
    select_by: str,
    refit: bool,
    n_jobs: int,
    progress: bool,
) -> Leaderboard:
    """Rank every head on every backbone subset by nested CV on val; refit the best, test it.

    ``blocks``: backbone -> (n_samples, dim_b) embeddings, rows aligned; subsets keep this
    order. ``logit_blocks``: backbone -> (n_samples, n_classes) logits, for heads whose
    ``input`` is "logits". ``y``: (n_samples,) int labels 0..n_classes-1. ``split``:
    (n_samples,) "train" / "val" / "test". ``heads``: head name -> params.yaml entry (lists
    are grids). ``class_names``: None names the classes by label. ``folds``,
    ``min_subset``, ``seed`` (the folds' shuffle and the heads' random_state), ``n_jobs``:
    the `compare` section; ``block_norm``, ``select_by``, ``refit``: `fuse`'s. ``fit_seconds``:
    wall time of a (head, subset)'s candidates, fitted one after another.
    """
    y, split = np.asarray(y), np.asarray(split).astype(str)
    n_classes, class_names = _check_inputs(blocks, logit_blocks, y, split, heads, class_names)
    rows = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    val_folds = _val_folds(y[rows["val"]], len(rows["train"]), class_names, folds, seed)
    sources = _Sources(blocks, logit_blocks or {})
    names = list(blocks)
    if not 1 <= min_subset <= len(names):
        raise ConfigError(f"min_subset must be in [1, {len(names)}]. Got {min_subset!r}.")
    subsets = [
        s for k in range(min_subset, len(names) + 1) for s in itertools.combinations(names, k)
    ]
    pairs = list(itertools.product(heads, subsets))
    grids = {
        (h, s): candidate_params(h, heads[h], sources.dims(h, s), block_norm, seed)
        for h, s in pairs
    }
    fitted = _fit_all(sources, grids, y, rows, n_jobs, progress)
    board = [
        _row(
            h, s, sources.dims(h, s), fitted[h, s], y[rows["val"]], val_folds, select_by, n_classes
        )
        for h, s in pairs
    ]
    board.sort(key=_rank_key)
    best = board[0]
    pick = {k: v for k, v in best.items() if k != "_candidates"}
    pick["test"] = _test_pick(best, sources, y, rows, select_by, refit, class_names)
    for row in board:
        del row["_candidates"]
    return Leaderboard(rows=board, pick=pick, folds=folds, n_cv=len(rows["val"]))


@dataclass(frozen=True)
class _Sources:
    """The blocks a head reads, by its input (`by_input`), joined for a backbone subset."""

    embeddings: dict[str, np.ndarray]
    logits: dict[str, np.ndarray]

    def _of(self, head: str) -> dict[str, np.ndarray]:
        return by_input(HEADS[head], embeddings=self.embeddings, logits=self.logits)

    def rows(self, head: str, subset: tuple, rows: np.ndarray) -> np.ndarray:
        """(len(rows), sum of the subset's widths): the subset's blocks side by side."""
        return np.concatenate([np.asarray(self._of(head)[b])[rows] for b in subset], axis=1)

    def dims(self, head: str, subset: tuple) -> list[int]:
        return [np.shape(self._of(head)[b])[1] for b in subset]


def _val_folds(
    y_val: np.ndarray, n_train: int, class_names: list[str], folds: int, seed: int
) -> list[np.ndarray]:
    """Stratified folds of the val rows (indices into them); DataError naming the class
    when one has fewer val rows than folds (a fold would lack it)."""
    if folds < 2:
        raise ConfigError(f"folds must be >= 2. Got {folds!r}.")
    counts = np.bincount(y_val, minlength=len(class_names))
    if n_train == 0 or counts.min() < folds:
        c = int(np.argmin(counts))
        raise DataError(
            f"compare needs train rows and at least {folds} val rows of every class (one per "
            f"fold, compare.folds = {folds}). Got {n_train} train rows; class "
            f"{class_names[c]!r} has {counts[c]} val row(s) (val per class: "
            f"{dict(zip(class_names, counts.tolist(), strict=True))}). Lower compare.folds."
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [held for _, held in splitter.split(np.zeros((len(y_val), 1)), y_val)]


def _fit_all(sources: _Sources, grids: dict, y, rows: dict, n_jobs: int, progress: bool) -> dict:
    """(head, subset) -> its candidates, each fitted on train and scored on val."""
    train, val = rows["train"], rows["val"]
    data = {key: (sources.rows(*key, train), sources.rows(*key, val)) for key in grids}
    jobs = [
        (key[0], p, data[key][0], y[train], data[key][1], y[val])
        for key, cands in grids.items()
        for p in cands
    ]
    bar = Progress(len(jobs), "compare", "fit", enabled=progress)
    fitted = iter(fit_many(jobs, n_jobs, bar))
    bar.close()
    return {key: [next(fitted) for _ in cands] for key, cands in grids.items()}


def _row(head, subset, dims, candidates, y_val, val_folds, select_by, n_classes) -> dict[str, Any]:
    """One leaderboard row: each fold scores the candidate the other folds chose."""
    labels = list(range(n_classes))
    acc, f1 = [], []
    for k, held in enumerate(val_folds):
        rest = np.concatenate([f for j, f in enumerate(val_folds) if j != k])
        pick = max(candidates, key=lambda c: rank_key(y_val[rest], c.val_proba[rest], select_by))
        pred = pick.val_proba[held].argmax(1)
        acc.append(accuracy_score(y_val[held], pred))
        f1.append(f1_score(y_val[held], pred, labels=labels, average="macro", zero_division=0))
    return {
        "head": head,
        "backbones": subset,
        "n_backbones": len(subset),
        "dim": sum(dims),
        "cv_accuracy_mean": round(float(np.mean(acc)), 6),
        "cv_accuracy_std": round(float(np.std(acc)), 6),
        "cv_f1_macro_mean": round(float(np.mean(f1)), 6),
        "cv_f1_macro_std": round(float(np.std(f1)), 6),
        "fit_seconds": round(sum(c.seconds for c in candidates), 3),
        "_candidates": candidates,
    }


def _test_pick(best, sources, y, rows, select_by, refit, class_names) -> dict | None:
    """The best row's head chosen on all val rows (refitted on train + val with ``refit``),
    scored once on test; None without test rows."""
    if not len(rows["test"]):
        return None
    head, subset = best["head"], best["backbones"]
    both = np.sort(np.concatenate([rows["train"], rows["val"]]))
    model, _ = choose(
        best["_candidates"],
        y[rows["val"]],
        select_by,
        refit,
        lambda: (sources.rows(head, subset, both), y[both]),
    )
    pred = model.predict(sources.rows(head, subset, rows["test"]))
    return classification_metrics(y[rows["test"]], pred, class_names)


def _check_inputs(blocks, logit_blocks, y, split, heads, class_names) -> tuple[int, list[str]]:
    """Shapes, labels, splits and head names agree; returns (n_classes, class_names)."""
    if not blocks:
        raise ConfigError("compare needs at least one backbone block.")
    if not heads:
        raise ConfigError("compare needs at least one head.")
    if y.ndim != 1 or split.shape != y.shape or len(y) == 0:
        raise DataError(
            f"y and split must be 1-D, aligned and non-empty. Got {y.shape} and {split.shape}."
        )
    unknown = sorted(set(np.unique(split).tolist()) - {"train", "val", "test"})
    if unknown:
        raise DataError(f"split holds {unknown}; allowed: ['train', 'val', 'test'].")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DataError(f"y must hold int labels 0..n_classes-1. Got dtype {y.dtype}.")
    n_classes = len(class_names) if class_names is not None else int(y.max()) + 1
    if y.max() >= n_classes:
        raise DataError(f"y holds label {int(y.max())} but there are {n_classes} class names.")
    for head, params in heads.items():
        accepted_params(head, params)  # names the unknown head or parameter
    inputs = {HEADS[h].input for h in heads}
    sources = [("blocks", blocks)]
    if "logits" in inputs:
        if logit_blocks is None or list(logit_blocks) != list(blocks):
            raise ConfigError(
                f"heads {sorted(heads)} include a logits head: logit_blocks must name the same "
                f"backbones as blocks, in order {list(blocks)}. Got "
                f"{None if logit_blocks is None else list(logit_blocks)}."
            )
        sources.append(("logit_blocks", logit_blocks))
    for label, mapping in sources:
        for name, array in mapping.items():
            if np.ndim(array) != 2 or len(array) != len(y):
                raise DataError(
                    f"{label}[{name!r}] must be (n_samples, dim) with {len(y)} rows like y. "
                    f"Got shape {np.shape(array)}."
                )
    return n_classes, [str(c) for c in (range(n_classes) if class_names is None else class_names)]
