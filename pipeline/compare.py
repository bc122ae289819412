"""Which heads on which backbone subsets: k-fold CV on train+val, test only for the pick."""

from __future__ import annotations

import csv
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from pipeline.errors import ConfigError, DataError
from pipeline.heads import HEADS, make_head
from pipeline.metrics import classification_metrics

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
    n_cv: int  # train+val rows the folds were drawn from

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
            f"{self.folds}-fold stratified CV on train+val ({self.n_cv} rows); "
            "test only for the pick. Mean ± std over folds.",
            "",
            "| rank | head | backbones | dim | CV macro-F1 | CV accuracy | fit s |",
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
) -> Leaderboard:
    """Cross-validate every head on every backbone subset; refit the best, test it once.

    ``blocks``: backbone -> (n_samples, dim_b) embeddings, rows aligned; subsets keep this
    order. ``logit_blocks``: backbone -> (n_samples, n_classes) logits, for heads whose
    ``input`` is "logits". ``y``: (n_samples,) int labels 0..n_classes-1. ``split``:
    (n_samples,) "train" / "val" / "test". ``heads``: head name -> constructor params, used
    as given. Folds are drawn from train+val rows only; test rows are sliced off before any
    fit and used once, by the pick. ``fit_seconds`` is the mean per fold (fit + predict).
    """
    y, split = np.asarray(y), np.asarray(split).astype(str)
    names = list(blocks)
    n_classes, class_names = _check_inputs(blocks, logit_blocks, y, split, heads, class_names)
    if not 1 <= min_subset <= len(names):
        raise ConfigError(f"min_subset must be in [1, {len(names)}]. Got {min_subset!r}.")
    if folds < 2:
        raise ConfigError(f"folds must be >= 2. Got {folds!r}.")
    cv, test = np.isin(split, ("train", "val")), split == "test"
    sources = {"embeddings": blocks, "logits": logit_blocks or {}}
    subsets = [
        s for k in range(min_subset, len(names) + 1) for s in itertools.combinations(names, k)
    ]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_idx = list(splitter.split(np.zeros((cv.sum(), 1)), y[cv]))
    labels = list(range(n_classes))

    def features(head: str, subset: tuple, rows: np.ndarray) -> np.ndarray:
        source = sources[HEADS[head].input]
        return np.concatenate([np.asarray(source[b])[rows] for b in subset], axis=1)

    rows = []
    bar = tqdm(total=len(heads) * len(subsets), desc="compare", disable=not progress)
    for head, subset in itertools.product(heads, subsets):
        bar.set_postfix_str(f"{head} on {'+'.join(subset)}")
        X, y_cv = features(head, subset, cv), y[cv]
        acc, f1, start = [], [], time.perf_counter()
        for train, val in fold_idx:
            pred = make_head(head, **heads[head]).fit(X[train], y_cv[train]).predict(X[val])
            acc.append(accuracy_score(y_cv[val], pred))
            f1.append(f1_score(y_cv[val], pred, labels=labels, average="macro", zero_division=0))
        rows.append(
            {
                "head": head,
                "backbones": subset,
                "n_backbones": len(subset),
                "dim": X.shape[1],
                "cv_accuracy_mean": round(float(np.mean(acc)), 6),
                "cv_accuracy_std": round(float(np.std(acc)), 6),
                "cv_f1_macro_mean": round(float(np.mean(f1)), 6),
                "cv_f1_macro_std": round(float(np.std(f1)), 6),
                "fit_seconds": round((time.perf_counter() - start) / folds, 3),
            }
        )
        bar.update()
    bar.close()
    rows.sort(key=_rank_key)
    best = rows[0]
    pick = {**best, "test": None}
    if test.any():
        model = make_head(best["head"], **heads[best["head"]])
        model.fit(features(best["head"], best["backbones"], cv), y[cv])
        pred = model.predict(features(best["head"], best["backbones"], test))
        pick["test"] = classification_metrics(y[test], pred, class_names)
    return Leaderboard(rows=rows, pick=pick, folds=folds, n_cv=int(cv.sum()))


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
    inputs = {make_head(h, **p).input for h, p in heads.items()}  # validates names and params
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
