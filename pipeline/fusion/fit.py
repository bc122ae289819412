"""Stage two: fusion heads on the concatenated cached embeddings, and their evaluation.

A head is trained on the train split, selects its epoch (where it has one) on val, gets
its temperature from val, and is scored once on test. Its sidecar pins the caches it was
trained on, so a head whose caches have since changed is refused rather than silently reused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.special import softmax

from pipeline import layout
from pipeline.calibration import fit_temperature, tempered
from pipeline.config import (
    AUTO,
    FuseParams,
    backbone_names,
    evaluate_params,
    head_names,
    section,
)
from pipeline.data.manifest import Manifest
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.fusion.heads import (
    HEADS,
    Head,
    SeedRefits,
    by_input,
    check_head_fits,
    chosen_val_scores,
    load_head,
    load_seed_heads,
    streaming_heads,
)
from pipeline.fusion.selection import (
    FIXED,
    accepted_params,
    best_on_val,
    candidate_params,
    choose,
    fit_many,
    grid_axes,
    val_scores,
)
from pipeline.metrics import classification_metrics
from pipeline.storage.fused import FusedFeatures, LazyRows, load_features


def fused_features(
    manifest: Manifest, features_dir: Path, params_path: Path | str
) -> FusedFeatures:
    """The caches of `fuse.backbones` (default: every entry of `backbones`), aligned to
    ``manifest`` and concatenated in that order: what fuse, evaluate and compare read. X
    stays in the caches (a LazyRows) when it would take more than `fuse.memory_gb`."""
    params = section(FuseParams, "fuse", params_path)
    backbones = list(params.backbones or backbone_names(params_path))
    paths = [layout.feature_cache(b, features_dir) for b in backbones]
    return load_features(paths, backbones, manifest=manifest, max_bytes=params.max_bytes)


def head_input(features: FusedFeatures, head) -> np.ndarray | LazyRows:
    """``(n_samples, n_features)``: concatenated embeddings, or concatenated logits for
    score-level heads (``head.input == "logits"``)."""
    return by_input(head, embeddings=features.X, logits=np.concatenate(features.logits, axis=1))


def in_memory(features: FusedFeatures, who: str) -> np.ndarray:
    """``features.X`` as an array, read from the caches if load_features left it there;
    ConfigError naming ``who`` when that exceeds the memory budget."""
    if not isinstance(features.X, LazyRows):
        return features.X
    _check_budget(features, who, len(features.X))
    return features.X[:]


def _check_budget(features: FusedFeatures, who: str, n_rows: int) -> None:
    """ConfigError naming ``who`` when ``n_rows`` fused rows exceed the memory budget."""
    need = n_rows * features.X.shape[1] * features.X.dtype.itemsize
    if need > features.max_bytes:
        raise ConfigError(
            f"{who} needs {n_rows} rows of the fused features in memory, {need:,} bytes as "
            f"float32, over the memory budget fuse.memory_gb ({features.max_bytes:,} bytes); "
            f"raise it, or use a head that streams: {streaming_heads()}."
        )


def _select(X: np.ndarray | LazyRows, rows: np.ndarray) -> np.ndarray | LazyRows:
    """X[rows]; a lazy view for a LazyRows, which heads read block by block."""
    return X.take(rows) if isinstance(X, LazyRows) else X[rows]


def _rows(features: FusedFeatures, split: str) -> np.ndarray:
    rows = np.flatnonzero(features.split == split)
    if len(rows) == 0:
        raise DataError(
            f"The {split} split is empty in the feature caches of {', '.join(features.backbones)}."
        )
    return rows


def fit_head(
    features: FusedFeatures, name: str, params: dict, fuse: FuseParams, *, seed: int | None = None
) -> tuple[Head, dict]:
    """Fit head ``name`` on train, choosing among its candidates on val; return it and its
    sidecar.

    ``params`` are the head's params.yaml entry: a list value is a grid axis, every
    combination a candidate (`pipeline.fusion.selection.grid`). Embedding heads get
    ``fuse.block_norm`` (unless their entry sets one) and the backbones' widths. Each
    candidate is fitted on the train rows (an MLP also picks its epoch on val); the best on
    val by ``fuse.select_by`` wins and, with ``fuse.refit``, is fitted again on train + val
    with what val chose (`Head.refit_params`). Its temperature is fitted on the chosen
    candidate's val probabilities (before the refit, which sees val). Test rows are never
    read. ``seed`` (default ``fuse.seed``) seeds heads that draw random numbers.
    """
    seed = fuse.seed if seed is None else seed
    cands = candidate_params(name, params, list(features.dims), fuse.block_norm, seed)
    train, val = _rows(features, "train"), _rows(features, "val")
    X, y = head_input(features, HEADS[name]), features.y
    X_train, X_val = _split_rows(features, X, name, train, val)
    candidates = fit_many([(name, p, X_train, y[train], X_val, y[val]) for p in cands], fuse.n_jobs)

    def both():
        rows = np.sort(np.concatenate([train, val]))
        return _split_rows(features, X, name, rows)[0], y[rows]

    head, chosen = choose(candidates, y[val], fuse.select_by, fuse.refit, both)
    head.temperature_ = fit_temperature(chosen.val_proba, y[val])
    return head, _sidecar(features, head, params, fuse, candidates, chosen)


def fit_seed_refits(
    features: FusedFeatures, name: str, params: dict, fuse: FuseParams
) -> SeedRefits:
    """Head ``name`` fitted as `fit_head` fits it with each seed of ``fuse.seeds`` but
    ``fuse.seed`` (the head itself): the seed study evaluate reports. A head with no
    random state is not refitted: its seeds are ``[fuse.seed]``. Test rows are never read."""
    if "random_state" not in accepted_params(name, params):
        return SeedRefits(fuse.seed, (fuse.seed,))
    others = [s for s in fuse.seeds if s != fuse.seed]
    refits = {s: fit_head(features, name, params, fuse, seed=s) for s in others}
    return SeedRefits(fuse.seed, tuple(fuse.seeds), refits)


def _sidecar(
    features: FusedFeatures, head: Head, params: dict, fuse: FuseParams, candidates, chosen
) -> dict:
    """What head.json records besides the head: the caches and checkpoints it was trained
    on, the classes, the rows it saw and how its params were chosen on val."""
    train, val, y = _rows(features, "train"), _rows(features, "val"), features.y
    names = list(features.class_names)
    val_metrics = classification_metrics(y[val], chosen.val_proba.argmax(1), names)
    n_oof = 0 if features.out_of_fold is None else int(features.out_of_fold[train].sum())
    return {
        "head": head.name,
        "backbones": list(features.backbones),
        "dims": list(features.dims),
        "input": head.input,
        "cache_sha256": dict(features.checksums),
        "extraction": features.extraction,  # `defuse predict` refuses other checkpoints
        "class_names": names,
        "n_train": len(train),
        "n_train_out_of_fold": n_oof,
        "n_val": len(val),
        "val_metrics": {k: val_metrics[k] for k in ("accuracy", "f1_macro", "n")},
        "selection": {
            "select_by": fuse.select_by,
            "refit_on_train_val": fuse.refit,
            "chosen": {k: v for k, v in chosen.params.items() if k not in FIXED},
            "chosen_val": chosen.scores(y[val]),  # before the refit: evaluate's "auto" reads it
            "candidates": [
                {k: c.params[k] for k in grid_axes(params)} | {"val": c.scores(y[val])}
                for c in candidates
            ],
        },
    }


def _split_rows(features: FusedFeatures, X, name: str, *row_sets: np.ndarray) -> list:
    """X at each of ``row_sets``: lazy views for a streaming head, arrays otherwise (within
    the memory budget)."""
    if isinstance(X, LazyRows) and not HEADS[name].streams:  # X is over budget; rows may fit
        _check_budget(features, f"Head {name!r}", sum(len(r) for r in row_sets))
        return [X[rows] for rows in row_sets]
    return [_select(X, rows) for rows in row_sets]


def check_head(sidecar: dict, features: FusedFeatures, where: Path | str) -> None:
    """Refuse a head whose backbones, classes or caches differ from ``features``."""
    check_head_fits(
        sidecar, class_names=features.class_names, backbones=features.backbones, where=where
    )
    changed = [
        b for b in features.backbones if sidecar["cache_sha256"].get(b) != features.checksums[b]
    ]
    if changed:
        raise CheckpointError(
            f"Head {where} was trained on other versions of the caches of {changed} (sha256 "
            f"differs); re-run `defuse fuse {sidecar['head']}` (or `dvc repro`)."
        )


def final_head(params_path: Path | str, heads_dir: Path = layout.HEADS) -> str:
    """The head predict, export and the summary use: evaluate.final_head, or with "auto" the
    entry of `heads` whose chosen candidate scored best on val under fuse.select_by, read
    from the sidecars in ``heads_dir`` (`best_on_val`). Test rows play no part."""
    choice = evaluate_params(params_path).final_head
    if choice != AUTO:
        return choice
    select_by = section(FuseParams, "fuse", params_path).select_by
    scores = {}
    for name in head_names(params_path):
        directory = layout.head_dir(name, heads_dir)
        if not directory.is_dir():
            raise CheckpointError(
                f"evaluate.final_head is {AUTO!r}: every head of {params_path} competes on val, "
                f"but {directory} holds none; run `defuse fuse {name}` (or `dvc repro`), or "
                "name the head."
            )
        scores[name] = chosen_val_scores(load_head(directory)[1], directory)
    return best_on_val(scores, select_by)


def evaluate(features: FusedFeatures, head_dirs: dict[str, Path]) -> dict[str, dict]:
    """Test-split predictions of every single fine-tuned model (its own classifier's logits,
    from the cache) and of every fusion head, and each head's seed refits' test scores.
    Nothing is fitted but each single model's temperature, on its val rows (a head's came
    with it from fuse).

    Returns ``{name: {"kind": "single" | "fusion", "y_true": (n,), "y_pred": (n,),
    "proba": (n, C) calibrated probabilities, "proba_raw": (n, C) before the temperature,
    "temperature": float, "p_pred": (n,) the calibrated probability of its prediction,
    "metrics": dict, "val": the val scores it is picked by (a single model's own, a head's
    chosen candidate's before its refit), "sidecar": the head's sidecar, or None for a single
    model, "seeds": for a head {"seeds": [...], "accuracy": [...], "f1_macro": [...]} of its
    refits (`SeedRefits`), else None}}``, rows in the caches' order of the test split.
    """
    test, val = _rows(features, "test"), _rows(features, "val")
    names = list(features.class_names)
    y, labels = features.y[test], np.arange(len(names))
    results = {}
    for b, logits in zip(features.backbones, features.logits, strict=True):
        val_proba = softmax(logits[val].astype(np.float64), 1)
        temperature = fit_temperature(val_proba, features.y[val])
        proba = softmax(logits[test].astype(np.float64), 1)
        results[b] = _scored("single", y, labels, proba, temperature, names)
        results[b]["val"] = val_scores(features.y[val], val_proba)
    for name, directory in head_dirs.items():
        head, sidecar = load_head(directory)
        check_head(sidecar, features, directory)
        X = _select(head_input(features, head), test)
        proba = head.predict_proba(X, calibrated=False)
        results[name] = _scored("fusion", y, head.classes_, proba, head.temperature_, names)
        results[name]["val"] = chosen_val_scores(sidecar, directory)
        results[name]["sidecar"] = sidecar
        results[name]["seeds"] = _seed_scores(load_seed_heads(directory), X, y, names)
    return results


def _scored(kind, y, labels, raw: np.ndarray, temperature: float, names) -> dict:
    """The results of ``raw`` probabilities of the classes ``labels`` (its columns), with a
    column per class of ``names`` from here on (0 for a class the model never learned)."""
    full = np.zeros((len(raw), len(names)))
    full[:, labels] = raw
    proba = tempered(full, temperature)
    y_pred = proba.argmax(1)  # what head.predict returns; a temperature keeps it
    return {
        "kind": kind,
        "y_true": y,
        "y_pred": y_pred,
        "proba": proba,
        "proba_raw": full,
        "temperature": temperature,
        "p_pred": proba.max(1),
        "metrics": classification_metrics(y, y_pred, names),
        "sidecar": None,
        "seeds": None,
    }


def _seed_scores(heads: dict[int, Head], X, y: np.ndarray, names: list[str]) -> dict[str, list]:
    runs = {"seeds": list(heads), "accuracy": [], "f1_macro": []}
    for head in heads.values():
        metrics = classification_metrics(y, head.predict(X), names)
        runs["accuracy"].append(metrics["accuracy"])
        runs["f1_macro"].append(metrics["f1_macro"])
    return runs
