"""Stage two on real HDF5 caches of synthetic embeddings: fit, refuse stale heads, evaluate,
stream features over the memory budget, and the human-facing report."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import feature_attrs, head_entry, head_kwargs, params_of, write_params

from pipeline import layout
from pipeline.calibration import fit_temperature, tempered
from pipeline.config import FuseParams, ReviewParams
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.fusion.fit import (
    check_head,
    evaluate,
    final_head,
    fit_head,
    fit_seed_refits,
    fused_features,
    in_memory,
)
from pipeline.fusion.heads import HEADS, Head, SeedRefits, load_head, make_head, save_head
from pipeline.report.summary import write_reports
from pipeline.storage.feature_cache import CacheWriter
from pipeline.storage.fused import LazyRows, load_features

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["crack", "scratch", "clean"]
N = 90
FUSE = params_of(
    FuseParams, "fuse", backbones=None, seed=0, seeds=[0], memory_gb=2.0, block_norm="l2",
    select_by="log_loss", refit=False, n_jobs=1,
)  # fmt: skip
FAST_MLP = {"epochs": 5, "hidden": 8, "patience": None}


def _save(head, side, directory, refits=None):
    """``head`` saved as `defuse fuse` saves it (by default without seed refits)."""
    return save_head(head, directory, side, seed_refits=refits or SeedRefits(0, (0,)))


def write_cache(path, backbone, dim, seed, split=None, manifest_sha="m" * 64):
    rng = np.random.default_rng(seed)
    y = np.arange(N) % 3
    means = 1.5 * rng.normal(size=(3, dim))  # learnable: one direction per class
    emb = (rng.normal(size=(N, dim)) + means[y]).astype(np.float32)
    logits = rng.normal(size=(N, 3)).astype(np.float32) + 2 * np.eye(3)[y]
    split = split if split is not None else np.array(["train", "val", "test"])[np.arange(N) % 5 % 3]
    attrs = feature_attrs(backbone, CLASSES, manifest_sha256=manifest_sha)
    with CacheWriter(path, N, dim, attrs) as w:
        w.write(0, emb, logits, [f"{i:064x}" for i in range(N)], y, split)
    return path


@pytest.fixture
def features(tmp_path):
    paths = [write_cache(tmp_path / "a.h5", "a", 8, 0), write_cache(tmp_path / "b.h5", "b", 4, 1)]
    return load_features(paths, ["a", "b"])


@pytest.mark.parametrize("name", ["mlp", "logreg", "late"])
def test_fit_head_learns_and_pins_its_caches(features, name):
    head, side = fit_head(
        features, name, head_entry(name, **FAST_MLP if name == "mlp" else {}), FUSE
    )
    assert side["backbones"] == ["a", "b"] and side["dims"] == [8, 4]
    assert side["cache_sha256"] == features.checksums
    assert side["input"] == head.input
    assert side["n_train"] == int((features.split == "train").sum())
    assert side["val_metrics"]["accuracy"] > 0.5  # chance is 1/3


def test_unknown_head_lists_the_registered_ones(features):
    with pytest.raises(ConfigError, match="logreg"):
        fit_head(features, "nope", {}, FUSE)


def test_empty_split_is_named(tmp_path):
    split = np.array(["train", "test"])[np.arange(N) % 2]
    feats = load_features([write_cache(tmp_path / "a.h5", "a", 4, 0, split=split)], ["a"])
    with pytest.raises(DataError, match="val split is empty"):
        fit_head(feats, "logreg", head_entry("logreg"), FUSE)


def test_stale_or_foreign_heads_are_refused(tmp_path, features):
    _, side = fit_head(features, "logreg", head_entry("logreg"), FUSE)
    check_head(side, features, "h")  # the caches it was trained on: accepted
    with pytest.raises(CheckpointError, match="backbones"):
        check_head(side, load_features([features.paths[1], features.paths[0]], ["b", "a"]), "h")
    write_cache(tmp_path / "b.h5", "b", 4, seed=2)  # re-extracted: same shape, other values
    with pytest.raises(CheckpointError, match=r"other versions of the caches of \['b'\]"):
        check_head(side, load_features(features.paths, ["a", "b"]), "h")
    with pytest.raises(CheckpointError, match="classes"):
        check_head({**side, "class_names": ["x", "y"]}, features, "h")


ROW_BYTES = 12 * 4  # a + b: 8 + 4 float32 columns


def _lazy(features, block_rows):
    """The same caches as ``features``, left on disk and read ``block_rows`` at a time."""
    lazy = load_features(features.paths, features.backbones, max_bytes=block_rows * 32 * ROW_BYTES)
    assert isinstance(lazy.X, LazyRows) and lazy.X.block_rows == block_rows
    return lazy


def test_mlp_streams_small_blocks_and_one_block_is_the_in_memory_fit(features):
    split = features.split
    train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    X, y, params = features.X, features.y, head_kwargs("mlp", **FAST_MLP)
    dense = make_head("mlp", **params).fit(X[train], y[train], X[val], y[val])

    lazy = _lazy(features, block_rows=2).X  # 36 train rows: 18 blocks
    streamed = make_head("mlp", **params).fit(lazy.take(train), y[train], lazy.take(val), y[val])
    assert len(streamed.history_) == 5 and streamed.history_[-1]["val_acc"] > 0.6  # chance 1/3
    # Block by block equals all at once up to float32 rounding (matmul kernels differ by shape).
    proba = streamed.predict_proba(lazy.take(val))
    np.testing.assert_allclose(proba, streamed.predict_proba(X[val]), atol=1e-6)
    assert streamed.history_ != dense.history_  # another shuffle: blocks, then rows in each

    lazy.block_rows = len(lazy)  # one block: exactly the in-memory fit
    single = make_head("mlp", **params).fit(lazy.take(train), y[train], lazy.take(val), y[val])
    assert single.history_ == dense.history_ and single.best_epoch_ == dense.best_epoch_
    np.testing.assert_array_equal(single.predict_proba(X), dense.predict_proba(X))


@pytest.mark.parametrize("name", [h for h in HEADS if HEADS[h].input == "embeddings"])
def test_every_head_predicts_from_lazy_rows_and_only_streaming_heads_fit_them(features, name):
    X, y = features.X, features.y
    lazy = _lazy(features, block_rows=2).X
    head = make_head(
        name, **head_kwargs(name, **({"epochs": 2, "hidden": 8} if name == "mlp" else {}))
    )
    if HEADS[name].streams:
        head.fit(lazy, y)
    else:
        with pytest.raises(DataError, match=rf"{name} learns from an in-memory array only.*mlp"):
            head.fit(lazy, y)
        head.fit(X, y)
    np.testing.assert_allclose(head.predict_proba(lazy), head.predict_proba(X), atol=1e-6)


def test_fit_head_streams_over_budget_and_names_heads_that_cannot(features, tmp_path):
    lazy = _lazy(features, block_rows=1)  # X (90 rows) and train + val (72 rows) over budget
    head, side = fit_head(lazy, "mlp", head_entry("mlp", **FAST_MLP), FUSE)
    assert side["val_metrics"]["accuracy"] > 0.6 and side["cache_sha256"] == features.checksums
    with pytest.raises(ConfigError) as err:
        fit_head(lazy, "logreg", head_entry("logreg", C=1.0), FUSE)
    assert str(err.value) == (
        "Head 'logreg' needs 72 rows of the fused features in memory, 3,456 bytes as float32, "
        "over the memory budget fuse.memory_gb (1,536 bytes); raise it, or use a head that "
        "streams: ['mlp']."
    )
    with pytest.raises(ConfigError, match="defuse compare needs 90 rows"):
        in_memory(lazy, "defuse compare")
    np.testing.assert_array_equal(
        in_memory(replace(lazy, max_bytes=N * ROW_BYTES), "c"), features.X
    )
    fit_head(lazy, "late", head_entry("late"), FUSE)  # logits are always in memory

    roomy = load_features(features.paths, features.backbones, max_bytes=80 * ROW_BYTES)
    assert isinstance(roomy.X, LazyRows)  # X is over budget, but train + val fit
    logreg, _ = fit_head(roomy, "logreg", head_entry("logreg"), FUSE)
    dense, _ = fit_head(features, "logreg", head_entry("logreg"), FUSE)
    np.testing.assert_array_equal(logreg.coef_, dense.coef_)

    heads = {"mlp": _save(head, side, tmp_path / "mlp")}
    streamed, in_ram = evaluate(lazy, heads), evaluate(features, heads)
    np.testing.assert_array_equal(streamed["mlp"]["y_pred"], in_ram["mlp"]["y_pred"])


def test_fuse_params_memory_budget_switches_to_streaming(features, tmp_path):
    ids = [f"{i:064x}" for i in range(N)]
    manifest = SimpleNamespace(sample_id=ids, label=features.y, split=features.split,
                               sha256="m" * 64)  # fmt: skip
    params = tmp_path / "params.yaml"
    folder = features.paths[0].parent
    for memory_gb, lazy in ((2.0, False), (1e-9, True)):
        write_params(params, fuse={"backbones": ["a", "b"], "memory_gb": memory_gb})
        fused = fused_features(manifest, folder, params)
        assert isinstance(fused.X, LazyRows) is lazy and fused.max_bytes == int(memory_gb * 1e9)
    write_params(params, fuse={"memory_gb": 0})
    with pytest.raises(ConfigError, match=r"fuse\.memory_gb must be a number > 0\. Got 0\."):
        fused_features(manifest, folder, params)


def test_evaluate_scores_singles_and_heads_and_writes_the_report(tmp_path, features):
    heads = {}
    for name in ("logreg", "late"):
        head, side = fit_head(features, name, head_entry(name), FUSE)
        heads[name] = _save(head, side, tmp_path / "heads" / name)
    results = evaluate(features, heads)
    assert list(results) == ["a", "b", "logreg", "late"]
    assert [r["kind"] for r in results.values()] == ["single", "single", "fusion", "fusion"]
    n_test = int((features.split == "test").sum())
    assert all(r["metrics"]["n"] == n_test for r in results.values())
    own = features.logits[0].argmax(1)  # a single model is scored by its own classifier
    np.testing.assert_array_equal(results["a"]["y_pred"], own[features.split == "test"])

    paths = layout.evaluate_reports(tmp_path / "reports")
    context = {
        "dataset": "synthetic",
        "n_test": n_test,
        "class_names": CLASSES,
        "backbones": ["a", "b"],
        "fused_dim": 12,
    }
    review = params_of(ReviewParams, "review", defect_free=["clean"], rates=[0.0, 0.1, 0.5])
    evidence = write_reports(
        results, "logreg", context, paths, {}, draws=500, seed=0, gallery=None,
        select_by="accuracy", auto=True, review=review,
    )  # fmt: skip
    summary = paths["summary"].read_text()
    best = max("ab", key=lambda b: results[b]["metrics"]["accuracy"])
    assert evidence["best_single"] == best and set(evidence["heads"]) == {"logreg", "late"}
    saved = json.loads(paths["evidence"].read_text())
    assert saved["vs_best_single"]["heads"]["logreg"]["draws"] == 500
    assert saved["seeds"]["logreg"]["seeds"] == [0]
    assert f"## Fusion vs the best single model (`{best}`, test split)" in summary
    assert saved["verdict"].startswith("The final head `logreg` ") and saved["verdict"] in summary
    assert "| logreg | 0 |" in summary and "| late | 0 |" in summary  # no random state: one fit
    assert "## Hyper-parameters chosen on val (never on test)" in summary
    assert "| logreg | fusion head |" in summary and "| a | single (fine-tuned) |" in summary
    assert "Per-class results of the `logreg` fusion head" in summary
    for name in CLASSES:
        assert f"| {name} |" in summary
    assert (paths["figures"] / "confusion_logreg.png").stat().st_size > 1000
    assert (paths["figures"] / "comparison.png").is_file()
    assert (paths["figures"] / "gains.png").stat().st_size > 1000
    assert "![gains](figures/gains.png)" in summary
    rows = (paths["confusion"] / "late.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == n_test + 1

    decisions = json.loads(paths["decisions"].read_text())
    assert decisions["final_head"]["name"] == "logreg" and decisions["final_head"]["auto"]
    assert set(decisions["final_head"]["val"]) == {"logreg", "late"}
    assert "## The final head: `logreg`" in summary and "chosen on val by accuracy" in summary
    assert set(decisions["calibration"]) == {"a", "b", "logreg", "late"}
    calibration = decisions["calibration"]["logreg"]
    assert calibration["temperature"] == round(results["logreg"]["temperature"], 6)
    assert len(calibration["log_loss"]) == len(calibration["ece"]) == 2
    assert "## Calibration (test split)" in summary and "![reliability]" in summary
    tables = decisions["review"]["models"]
    assert decisions["review"]["defect_free"] == ["clean"] and set(tables) == {"logreg", best}
    assert [r["rate"] for r in tables["logreg"]] == [0.0, 0.1, 0.5]
    assert [r["reviewed"] for r in tables["logreg"]] == [0, n_test // 10, n_test // 2]
    assert tables["logreg"][0]["accuracy_kept"] == results["logreg"]["metrics"]["accuracy"]
    assert "## Sending the least sure answers to a person" in summary
    for figure in ("reliability", "risk_coverage"):
        assert (paths["figures"] / f"{figure}.png").stat().st_size > 1000


def _shuffled_test_labels(features, seed=0):
    """``features`` with the test rows' labels permuted: what a peek at test would notice."""
    y, test = features.y.copy(), np.flatnonzero(features.split == "test")
    y[test] = np.random.default_rng(seed).permutation(y[test])
    assert (y != features.y).any()
    return replace(features, y=y)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("logreg", {"C": [1e-4, 0.01, 1.0]}),
        ("mlp", {"epochs": 4, "hidden": [4, 16], "weight_decay": [0.0, 0.1], "patience": None}),
        ("ridge", {"alpha": [0.1, 1000.0]}),
    ],
)
def test_grid_is_chosen_on_val_and_never_looks_at_test(features, name, params):
    head, side = fit_head(features, name, head_entry(name, **params), FUSE)
    sel = side["selection"]
    n = int(np.prod([len(v) for v in params.values() if isinstance(v, list)]))
    assert len(sel["candidates"]) == n and sel["select_by"] == "log_loss"
    best = max(sel["candidates"], key=lambda c: c["val"]["log_loss"])
    assert all(sel["chosen"][k] == best[k] for k in best if k != "val")
    assert sel["chosen"]["block_norm"] == "l2" and head.block_dims == [8, 4]

    peeked, peeked_side = fit_head(
        _shuffled_test_labels(features), name, head_entry(name, **params), FUSE
    )
    assert peeked_side["selection"] == sel and peeked.temperature_ == head.temperature_
    np.testing.assert_array_equal(peeked.predict_proba(features.X), head.predict_proba(features.X))


def test_select_by_accuracy_and_a_head_entry_overriding_block_norm(features):
    fuse = replace(FUSE, select_by="accuracy")
    entry = head_entry("logreg", C=[1e-4, 1.0], block_norm="none")
    _, side = fit_head(features, "logreg", entry, fuse)
    sel = side["selection"]
    best = max(sel["candidates"], key=lambda c: (c["val"]["accuracy"], c["val"]["log_loss"]))
    assert sel["chosen"]["C"] == best["C"] and sel["chosen"]["block_norm"] == "none"
    with pytest.raises(ConfigError, match=r"\['C'\] hold an empty list"):
        fit_head(features, "logreg", head_entry("logreg", C=[]), FUSE)


def test_refit_on_train_and_val_repeats_the_chosen_epoch(features):
    params = head_entry("mlp", epochs=6, hidden=8, patience=None, weight_decay=0.0)
    chosen, side = fit_head(features, "mlp", params, FUSE)
    refit, refit_side = fit_head(features, "mlp", params, replace(FUSE, refit=True))
    assert refit_side["selection"]["refit_on_train_val"] is True
    assert refit.epochs == chosen.best_epoch_ == len(refit.history_)
    assert refit_side["val_metrics"] == side["val_metrics"]  # the chosen candidate's, on val
    assert not np.array_equal(refit.predict_proba(features.X), chosen.predict_proba(features.X))


def test_fuse_saves_seed_refits_and_evaluate_only_reads_them(features, tmp_path, monkeypatch):
    fuse = replace(FUSE, seeds=(0, 1, 2))
    heads = {
        "mlp": head_entry("mlp", epochs=3, hidden=8),
        "logreg": head_entry("logreg", C=[0.1, 1.0]),
    }
    dirs = {}
    for name, entry in heads.items():
        head, side = fit_head(features, name, entry, fuse)
        refits = fit_seed_refits(features, name, entry, fuse)
        dirs[name] = _save(head, side, tmp_path / name, refits)
    assert sorted(p.name for p in (tmp_path / "mlp" / "seeds").iterdir()) == ["1", "2"]
    assert not (tmp_path / "logreg" / "seeds").exists()  # no random state: fitted once

    monkeypatch.setattr(Head, "fit", None)  # evaluate fits nothing
    results = evaluate(features, dirs)
    study = results["mlp"]["seeds"]
    assert study["seeds"] == [0, 1, 2] and len(set(study["f1_macro"])) > 1
    assert results["logreg"]["seeds"]["seeds"] == [0]
    assert study["accuracy"][0] == results["mlp"]["metrics"]["accuracy"]  # the head itself
    monkeypatch.undo()
    head, _ = fit_head(features, "mlp", heads["mlp"], fuse, seed=1)
    test = features.split == "test"
    acc = (head.predict(features.X[test]) == features.y[test]).mean()
    assert study["accuracy"][1] == pytest.approx(acc, abs=1e-6)


def test_a_heads_temperature_is_fitted_on_its_val_rows_and_calibrates_wherever_it_runs(
    features, tmp_path
):
    head, side = fit_head(features, "logreg", head_entry("logreg", C=1.0), FUSE)  # no refit
    val = features.split == "val"
    raw = head.predict_proba(features.X, calibrated=False)
    assert head.temperature_ == fit_temperature(raw[val], features.y[val]) != 1.0
    calibrated = head.predict_proba(features.X)
    np.testing.assert_allclose(calibrated, tempered(raw, head.temperature_))
    np.testing.assert_array_equal(calibrated.argmax(1), raw.argmax(1))  # same answers
    loaded, saved = load_head(_save(head, side, tmp_path / "h"))
    assert saved["fitted"]["temperature_"] == loaded.temperature_ == head.temperature_
    np.testing.assert_array_equal(loaded.predict_proba(features.X), calibrated)
    assert side["selection"]["chosen_val"]["accuracy"] == side["val_metrics"]["accuracy"]


def test_final_head_auto_is_the_best_on_val_and_test_labels_change_nothing(features, tmp_path):
    entries = {"logreg": head_entry("logreg", C=[1e-4, 1.0]), "late": head_entry("late")}
    params = write_params(
        tmp_path / "params.yaml",
        fuse={"select_by": "accuracy"},
        evaluate={"final_head": "auto"},
        heads=entries,
    )
    fuse = replace(FUSE, select_by="accuracy")

    def chosen(data, folder):
        sides = {}
        for name, entry in entries.items():
            head, sides[name] = fit_head(data, name, entry, fuse)
            _save(head, sides[name], layout.head_dir(name, folder))
        return final_head(params, folder), sides

    name, sides = chosen(features, tmp_path / "heads")
    val = {n: s["selection"]["chosen_val"] for n, s in sides.items()}
    assert name == max(val, key=lambda n: (val[n]["accuracy"], val[n]["log_loss"]))
    assert chosen(_shuffled_test_labels(features), tmp_path / "peeked") == (name, sides)

    results = evaluate(features, {n: layout.head_dir(n, tmp_path / "heads") for n in entries})
    peeked = evaluate(
        _shuffled_test_labels(features),
        {n: layout.head_dir(n, tmp_path / "heads") for n in entries},
    )
    for model, result in results.items():  # the single models' temperatures and val scores too
        assert peeked[model]["temperature"] == result["temperature"]
        assert peeked[model]["val"] == result["val"]
    named = write_params(tmp_path / "named.yaml", evaluate={"final_head": "late"}, heads=entries)
    assert final_head(named, tmp_path / "nowhere") == "late"  # named: no head is read


def test_final_head_auto_refuses_a_head_without_val_scores(features, tmp_path):
    head, side = fit_head(features, "late", head_entry("late"), FUSE)
    del side["selection"]["chosen_val"]
    _save(head, side, layout.head_dir("late", tmp_path))
    params = write_params(
        tmp_path / "params.yaml", evaluate={"final_head": "auto"}, heads={"late": {}}
    )
    with pytest.raises(CheckpointError, match=r"late/head.json: selection.chosen_val must give"):
        final_head(params, tmp_path)
    both = write_params(
        tmp_path / "both.yaml", evaluate={"final_head": "auto"}, heads={"ridge": {}, "late": {}}
    )
    with pytest.raises(CheckpointError, match=r"ridge holds none; run `defuse fuse ridge`"):
        final_head(both, tmp_path)
