"""Hyper-parameters chosen on val, never on test: a head's grid of candidates, fitted on
train in parallel and scored on val rows the backbones never trained on."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from sklearn.metrics import accuracy_score, f1_score, log_loss

from pipeline.config import SELECT_BY
from pipeline.errors import ConfigError
from pipeline.fusion.heads import Head, make_head
from pipeline.fusion.heads.base import check_param_names, head_class
from pipeline.runtime import keep_freed_memory
from pipeline.storage.fused import LazyRows

FIXED = ("block_dims",)  # list-valued by nature: never a grid axis


def grid_axes(params: dict[str, Any]) -> list[str]:
    """The params given as a list of values to try."""
    return [k for k, v in params.items() if isinstance(v, list | tuple) and k not in FIXED]


def grid(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the list-valued params (a grid axis each), in the order given;
    params without a list give one candidate. ``{"C": [0.1, 1], "max_iter": 100}`` -> 2."""
    axes = {k: params[k] for k in grid_axes(params)}
    empty = [k for k, v in axes.items() if not v]
    if empty:
        raise ConfigError(f"Head parameter(s) {empty} hold an empty list: give values to try.")
    combos = itertools.product(*axes.values())
    return [params | dict(zip(axes, combo, strict=True)) for combo in combos]


def accepted_params(name: str, params: dict[str, Any]) -> set[str]:
    """The constructor params of head ``name`` (its params.yaml entry's names checked on
    the way; `make_head` checks the values)."""
    check_param_names(name, grid(params)[0], complete=False)
    return set(head_class(name)._get_param_names())


def candidate_params(
    name: str, params: dict[str, Any], dims: list[int], block_norm: str, seed: int
) -> list[dict[str, Any]]:
    """The candidates of head ``name`` from its params.yaml entry ``params``: its grid, with
    ``block_norm`` (unless the entry sets one) and the blocks' widths ``dims`` for embedding
    heads, and ``seed`` for heads with random state; each one checked (`make_head`)."""
    accepted = accepted_params(name, params)
    base = dict(params)
    if "block_norm" in accepted:
        base = {"block_norm": block_norm, **base, "block_dims": list(dims)}
    if "random_state" in accepted:
        base["random_state"] = seed
    candidates = grid(base)
    for params in candidates:
        make_head(name, **params)  # a bad value stops here, before minutes of fitting
    return candidates


def score(y: np.ndarray, proba: np.ndarray, metric: str) -> float:
    """Higher is better: accuracy, macro F1, or minus the log loss of (n, C) ``proba``."""
    labels = np.arange(proba.shape[1])
    if metric == "log_loss":
        return -float(log_loss(y, np.clip(proba, 1e-12, 1), labels=labels))
    pred = proba.argmax(axis=1)
    if metric == "accuracy":
        return float(accuracy_score(y, pred))
    if metric == "f1_macro":
        return float(f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    raise ConfigError(f"The select_by parameter must be one of {list(SELECT_BY)}. Got {metric!r}.")


def val_scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """`score` of ``proba`` against ``y`` under every `fuse.select_by` metric, rounded for
    stable JSON: what a sidecar records and `rank` compares."""
    return {m: round(score(y, proba, m), 6) for m in SELECT_BY}


def rank(scores: dict[str, float], metric: str) -> tuple[float, float]:
    """Sort key of val ``scores`` (`score` of each metric: higher is better): ``metric``,
    then the log loss, which breaks the ties that accuracy and F1 have often on a few
    hundred rows (max() keeps the first of equal keys: the first listed)."""
    return scores[metric], scores["log_loss"]


def rank_key(y: np.ndarray, proba: np.ndarray, metric: str) -> tuple[float, float]:
    """`rank` of a candidate's val probabilities ``proba``."""
    return rank({m: score(y, proba, m) for m in {metric, "log_loss"}}, metric)


def best_on_val(val_scores: dict[str, dict[str, float]], metric: str) -> str:
    """The model that scored best on val (`rank` by ``metric``) of ``val_scores`` (name ->
    `score` of each metric): for evaluate.final_head "auto" each head's chosen candidate
    before its refit (its sidecar's selection.chosen_val), and the single model a user would
    have picked. A tie goes to the first listed."""
    return max(val_scores, key=lambda name: rank(val_scores[name], metric))


@dataclass
class Candidate:
    """One grid point: its params, the head fitted on train, its val probabilities (n_val, C)."""

    params: dict[str, Any]
    head: Head
    val_proba: np.ndarray
    seconds: float  # fit + val prediction

    def scores(self, y_val: np.ndarray) -> dict[str, float]:
        return val_scores(y_val, self.val_proba)


def _fit_one(name, params, X, y, X_val, y_val) -> Candidate:
    keep_freed_memory()  # joblib's workers are fresh processes, not forks of the CLI's
    start = time.perf_counter()
    head = make_head(name, **params).fit(X, y, X_val, y_val)
    return Candidate(params, head, head.predict_proba(X_val), time.perf_counter() - start)


def fit_many(jobs: list[tuple], n_jobs: int, progress=None) -> list[Candidate]:
    """Fit each job ``(head name, params, X, y, X_val, y_val)``: on (X, y), validating on
    (X_val, y_val), labels 0..n_classes-1; in ``n_jobs`` processes (1: in this one),
    results in job order. ``progress``: a tqdm bar to advance per job."""
    lazy = any(isinstance(job[2], LazyRows) for job in jobs)  # h5py views stay here
    if n_jobs == 1 or len(jobs) == 1 or lazy:
        results = (_fit_one(*job) for job in jobs)
    else:
        # joblib caps OpenMP / BLAS threads in its workers to their share of the cores.
        results = Parallel(n_jobs=n_jobs, return_as="generator")(
            delayed(_fit_one)(*job) for job in jobs
        )
    out = []
    for candidate in results:
        out.append(candidate)
        if progress is not None:
            progress.update()
    return out


def choose(
    candidates: list[Candidate], y_val: np.ndarray, metric: str, refit: bool, both=None
) -> tuple[Head, Candidate]:
    """The best candidate on val by ``metric`` (`rank_key`) and the head to
    keep: its own, or with ``refit`` one fitted anew on ``both()`` = (X, y) of train + val
    with what val chose (`Head.refit_params`)."""
    chosen = max(candidates, key=lambda c: rank_key(y_val, c.val_proba, metric))
    if not refit:
        return chosen.head, chosen
    X, y = both()
    name = chosen.head.name
    return make_head(name, **(chosen.params | chosen.head.refit_params())).fit(X, y), chosen
