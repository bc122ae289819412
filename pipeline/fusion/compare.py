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
from pipeline.fusion.heads import HEADS, make_head
from pipeline.fusion.selection import candidate_params, choose, fit_many, grid, rank_key
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
    folds: int = 5,
    min_subset: int = 1,
    seed: int = 0,
    logit_blocks: dict[str, np.ndarray] | None = None,
    progress: bool = True,
    class_names=None,
    block_norm: str = "l2",
    select_by: str = "log_loss",
    refit: bool = True,
    n_jobs: int = 1,
) -> Leaderboard:
    """Rank every head on every backbone subset by nested CV on val; refit the best, test it.

    ``blocks``: backbone -> (n_samples, dim_b) embeddings, rows aligned; subsets keep this
    order. ``logit_blocks``: backbone -> (n_samples, n_classes) logits, for heads whose
    ``input`` is "logits". ``y``: (n_samples,) int labels 0..n_classes-1. ``split``:
    (n_samples,) "train" / "val" / "test". ``heads``: head name -> params.yaml entry (lists
    are grids). ``block_norm``, ``select_by``, ``refit`` as in `fuse` (`FuseParams`);
    ``n_jobs`` processes share the fits. ``fit_seconds``: wall time of a (head, subset)'s
    candidates, fitted one after another.
    """
    y, split = np.asarray(y), np.asarray(split).astype(str)
    names = list(blocks)
    n_classes, class_names = _check_inputs(blocks, logit_blocks, y, split, heads, class_names)
    if not 1 <= min_subset <= len(names):
        raise ConfigError(f"min_subset must be in [1, {len(names)}]. Got {min_subset!r}.")
    if folds < 2:
        raise ConfigError(f"folds must be >= 2. Got {folds!r}.")
    train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    test = np.flatnonzero(split == "test")
    if len(train) == 0 or len(val) < folds:
        raise DataError(
            f"compare needs train rows and at least {folds} val rows (one per fold). "
            f"Got {len(train)} train and {len(val)} val rows."
        )
    sources = {"embeddings": blocks, "logits": logit_blocks or {}}
    subsets = [
        s for k in range(min_subset, len(names) + 1) for s in itertools.combinations(names, k)
    ]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    val_folds = [held for _, held in splitter.split(np.zeros((len(val), 1)), y[val])]
    labels = list(range(n_classes))

    def features(head: str, subset: tuple, rows: np.ndarray) -> np.ndarray:
        source = sources[HEADS[head].input]
        return np.concatenate([np.asarray(source[b])[rows] for b in subset], axis=1)

    def dims(head: str, subset: tuple) -> list[int]:
        return [np.shape(sources[HEADS[head].input][b])[1] for b in subset]

    pairs = list(itertools.product(heads, subsets))
    grids = {(h, s): candidate_params(h, heads[h], dims(h, s), block_norm, seed) for h, s in pairs}
    data = {(h, s): (features(h, s, train), features(h, s, val)) for h, s in pairs}
    jobs = [
        (h, p, data[h, s][0], y[train], data[h, s][1], y[val])
        for h, s in pairs
        for p in grids[h, s]
    ]
    bar = Progress(len(jobs), "compare", "fit", enabled=progress)
    fitted = iter(fit_many(jobs, n_jobs, bar))
    bar.close()

    rows, y_val = [], y[val]
    for head, subset in pairs:
        candidates = [next(fitted) for _ in grids[head, subset]]
        acc, f1 = [], []
        for k, held in enumerate(val_folds):
            rest = np.concatenate([f for j, f in enumerate(val_folds) if j != k])
            pick = max(
                candidates, key=lambda c: rank_key(y_val[rest], c.val_proba[rest], select_by)
            )
            pred = pick.val_proba[held].argmax(1)
            acc.append(accuracy_score(y_val[held], pred))
            f1.append(f1_score(y_val[held], pred, labels=labels, average="macro", zero_division=0))
        rows.append(
            {
                "head": head,
                "backbones": subset,
                "n_backbones": len(subset),
                "dim": sum(dims(head, subset)),
                "cv_accuracy_mean": round(float(np.mean(acc)), 6),
                "cv_accuracy_std": round(float(np.std(acc)), 6),
                "cv_f1_macro_mean": round(float(np.mean(f1)), 6),
                "cv_f1_macro_std": round(float(np.std(f1)), 6),
                "fit_seconds": round(sum(c.seconds for c in candidates), 3),
                "_candidates": candidates,
            }
        )
    rows.sort(key=_rank_key)
    best = rows[0]
    pick = {k: v for k, v in best.items() if k != "_candidates"}
    pick["test"] = None
    if len(test):
        head, subset = best["head"], best["backbones"]
        both = np.sort(np.concatenate([train, val]))
        model, _ = choose(
            best["_candidates"],
            y_val,
            select_by,
            refit,
            lambda: (features(head, subset, both), y[both]),
        )
        pred = model.predict(features(head, subset, test))
        pick["test"] = classification_metrics(y[test], pred, class_names)
    for row in rows:
        del row["_candidates"]
    return Leaderboard(rows=rows, pick=pick, folds=folds, n_cv=len(val))


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
    inputs = {make_head(h, **grid(p)[0]).input for h, p in heads.items()}  # checks names, params
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
