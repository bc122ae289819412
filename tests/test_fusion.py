"""Stage two on real HDF5 caches of synthetic embeddings: fit, refuse stale heads, evaluate,
and the human-facing report."""

import numpy as np
import pytest

from pipeline import layout
from pipeline.cache import CacheWriter, load_features
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.fusion import check_head, evaluate, fit_head
from pipeline.heads import save_head
from pipeline.report import write_reports

CLASSES = ["crack", "scratch", "clean"]
N = 90


def write_cache(path, backbone, dim, seed, split=None, manifest_sha="m" * 64):
    rng = np.random.default_rng(seed)
    y = np.arange(N) % 3
    emb = rng.normal(size=(N, dim)).astype(np.float32) + y[:, None]  # learnable
    logits = rng.normal(size=(N, 3)).astype(np.float32) + 2 * np.eye(3)[y]
    split = split if split is not None else np.array(["train", "val", "test"])[np.arange(N) % 5 % 3]
    attrs = {
        "backbone": backbone,
        "class_names": CLASSES,
        "checkpoint_sha256": "c" * 64,
        "manifest_sha256": manifest_sha,
        "input_size": 32,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "layer": "pre_logits",
        "tta": False,
        "versions": "{}",
        "created": "2026-01-01T00:00:00",
    }
    with CacheWriter(path, N, dim, 3, "float32", attrs) as w:
        w.write(0, emb, logits, [f"{i:064x}" for i in range(N)], y, split)
    return path


@pytest.fixture
def features(tmp_path):
    paths = [write_cache(tmp_path / "a.h5", "a", 8, 0), write_cache(tmp_path / "b.h5", "b", 4, 1)]
    return load_features(paths, ["a", "b"])


@pytest.mark.parametrize("name", ["mlp", "logreg", "late"])
def test_fit_head_learns_and_pins_its_caches(features, name):
    params = {"epochs": 5, "hidden": 8} if name == "mlp" else {}
    head, side = fit_head(features, name, params, seed=0)
    assert side["backbones"] == ["a", "b"] and side["dims"] == [8, 4]
    assert side["cache_sha256"] == features.checksums
    assert side["input"] == head.input
    assert side["n_train"] == int((features.split == "train").sum())
    assert side["val_metrics"]["accuracy"] > 0.5  # chance is 1/3


def test_unknown_head_lists_the_registered_ones(features):
    with pytest.raises(ConfigError, match="logreg"):
        fit_head(features, "nope", {}, seed=0)


def test_empty_split_is_named(tmp_path):
    split = np.array(["train", "test"])[np.arange(N) % 2]
    feats = load_features([write_cache(tmp_path / "a.h5", "a", 4, 0, split=split)], ["a"])
    with pytest.raises(DataError, match="val split is empty"):
        fit_head(feats, "logreg", {}, seed=0)


def test_stale_or_foreign_heads_are_refused(tmp_path, features):
    _, side = fit_head(features, "logreg", {}, seed=0)
    check_head(side, features, "h")  # the caches it was trained on: accepted
    with pytest.raises(CheckpointError, match="backbones"):
        check_head(side, load_features([features.paths[1], features.paths[0]], ["b", "a"]), "h")
    write_cache(tmp_path / "b.h5", "b", 4, seed=2)  # re-extracted: same shape, other values
    with pytest.raises(CheckpointError, match=r"other versions of the caches of \['b'\]"):
        check_head(side, load_features(features.paths, ["a", "b"]), "h")
    with pytest.raises(CheckpointError, match="classes"):
        check_head({**side, "class_names": ["x", "y"]}, features, "h")


def test_evaluate_scores_singles_and_heads_and_writes_the_report(tmp_path, features):
    heads = {}
    for name in ("logreg", "late"):
        head, side = fit_head(features, name, {}, seed=0)
        heads[name] = save_head(head, tmp_path / "heads" / name, side)
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
    write_reports(results, "logreg", context, paths, curves={})
    summary = paths["summary"].read_text()
    assert "| logreg | fusion head |" in summary and "| a | single (fine-tuned) |" in summary
    assert "Per-class results of the `logreg` fusion head" in summary
    for name in CLASSES:
        assert f"| {name} |" in summary
    assert (paths["figures"] / "confusion_logreg.png").stat().st_size > 1000
    assert (paths["figures"] / "comparison.png").is_file()
    rows = (paths["confusion"] / "late.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == n_test + 1
