"""The head artifact: saved and loaded whole (seed refits included), and every damaged,
foreign or hostile head.json / head.safetensors refused with one line naming the file."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_heads import data_for, fast_head, sidecar_for

from pipeline.errors import CheckpointError, ConfigError
from pipeline.fusion.heads import (
    SeedRefits,
    check_head_fits,
    list_heads,
    load_head,
    load_seed_heads,
    make_head,
    save_head,
)

ONE = SeedRefits(0, (0,))  # a head without seed refits


def _saved(tmp_path, name="logreg", **params):
    X, y = data_for(name)
    head = fast_head(name, **params).fit(X, y)
    return save_head(head, tmp_path / name, sidecar_for(head), seed_refits=ONE)


def _refused(directory, match):
    """load_head refuses ``directory`` with one line matching ``match``."""
    with pytest.raises(CheckpointError, match=match) as err:
        load_head(directory)
    assert "\n" not in str(err.value)
    return str(err.value)


def _edit_json(directory, **changes):
    path = directory / "head.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(meta | changes))


@pytest.mark.parametrize("name", list_heads())
def test_seed_refits_are_saved_and_loaded_with_the_head(name, tmp_path):
    X, y = data_for(name)
    own = fast_head(name).fit(X, y)
    seeded = "random_state" in own.get_params()
    others = {s: fast_head(name, random_state=s).fit(X, y) for s in (1, 2)} if seeded else {}
    refits = {s: (h, sidecar_for(h)) for s, h in others.items()}
    study = SeedRefits(0, (0, *others), refits)
    save_head(own, tmp_path / "h", sidecar_for(own), seed_refits=study)
    loaded = load_seed_heads(tmp_path / "h")
    assert list(loaded) == list(study.seeds)
    for seed, head in loaded.items():
        expected = own if seed == 0 else others[seed]
        np.testing.assert_array_equal(head.predict_proba(X), expected.predict_proba(X))
    assert json.loads((tmp_path / "h" / "seeds.json").read_text()) == study.to_json()


def test_seed_refits_must_match_the_study(tmp_path):
    X, y = data_for("mlp")
    head = fast_head("mlp").fit(X, y)
    with pytest.raises(ConfigError, match=r"seed refits given for seeds \[\].*are \[1\]"):
        save_head(head, tmp_path / "h", sidecar_for(head), seed_refits=SeedRefits(0, (0, 1)))
    assert not (tmp_path / "h").exists()
    save_head(head, tmp_path / "h", sidecar_for(head), seed_refits=ONE)
    (tmp_path / "h" / "seeds.json").write_text('{"seed": 0, "seeds": [0, 0]}')
    with pytest.raises(CheckpointError, match=r"seeds\.json must be .*distinct"):
        load_seed_heads(tmp_path / "h")
    (tmp_path / "h" / "seeds.json").unlink()
    with pytest.raises(CheckpointError, match=r"seeds\.json is missing.*defuse fuse mlp"):
        load_seed_heads(tmp_path / "h")


def test_nan_coefficients_are_refused_naming_file_and_array(tmp_path):
    directory = _saved(tmp_path)
    arrays = load_file(str(directory / "head.safetensors"))
    arrays["coef"][1, 2] = np.nan
    save_file(arrays, str(directory / "head.safetensors"))
    text = _refused(directory, r"head\.safetensors: array 'coef' holds 1 NaN or infinite")
    assert str(directory) in text


def test_a_nan_head_is_never_written(tmp_path):
    X, y = data_for("logreg")
    head = fast_head("logreg").fit(X, y)
    head.intercept_ = np.full_like(head.intercept_, np.inf)
    with pytest.raises(CheckpointError, match="array 'intercept' holds 3 NaN or infinite"):
        save_head(head, tmp_path / "h", sidecar_for(head), seed_refits=ONE)
    assert not (tmp_path / "h").exists()


def test_wrong_class_count_is_refused(tmp_path):
    directory = _saved(tmp_path)
    _edit_json(directory, classes=[0, 1])  # arrays hold 3 classes
    _refused(directory, r"array 'coef' is float32 \(3, 24\).*shape \(1, 24\)")  # binary: 1 row
    _edit_json(directory, classes=[0, 1, 2], class_names=["x", "y"])
    _refused(directory, r"'classes' must be >= 2 increasing labels in \[0, 2\)")
    _edit_json(directory, class_names=["x", "y", 3])
    _refused(directory, "'class_names' must be a list of distinct str")


def test_shapes_must_fit_the_backbones_widths(tmp_path):
    directory = _saved(tmp_path)
    _edit_json(directory, dims=[8, 8])
    _refused(directory, r"'n_features_in_' is 24, but its embeddings are 16 wide")
    _edit_json(directory, dims=[8], backbones=["a", "b"])
    _refused(directory, "'dims' must be one int >= 1 per backbone")


def test_reordered_class_names_or_backbones_do_not_fit(tmp_path):
    _, sidecar = load_head(_saved(tmp_path))
    check_head_fits(sidecar, class_names=["x", "y", "z"], backbones=["a", "b"], where="h")
    with pytest.raises(CheckpointError, match=r"predicts 3 classes \['x', 'y', 'z'\] \(in that"):
        check_head_fits(sidecar, class_names=["y", "x", "z"], backbones=["a", "b"], where="h")
    with pytest.raises(CheckpointError, match=r"backbones \['a', 'b'\] \(in that order\)"):
        check_head_fits(sidecar, class_names=["x", "y", "z"], backbones=["b", "a"], where="h")


def test_deeply_nested_json_is_one_clean_line(tmp_path):
    directory = _saved(tmp_path)
    (directory / "head.json").write_text("[" * 100_000 + "]" * 100_000)
    _refused(directory, r"head\.json is not a head sidecar: nested 100000 deep, over the 32")
    (directory / "head.json").write_text('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}')
    _refused(directory, "is not a head sidecar: 'head'")  # brackets in strings do not count


@pytest.mark.parametrize("key", ["predict_proba", "_proba", "__class__", "coef_"])
def test_fitted_may_only_name_learned_json_state(tmp_path, key):
    directory = _saved(tmp_path)
    meta = json.loads((directory / "head.json").read_text())
    _edit_json(directory, fitted=meta["fitted"] | {key: "print"})
    _refused(
        directory,
        rf"'fitted' must name exactly \['n_features_in_', 'temperature_'\], got .*'{key}'",
    )


def test_late_fitted_state_must_fit_its_width(tmp_path):
    directory = _saved(tmp_path, "late")
    meta = json.loads((directory / "head.json").read_text())
    _edit_json(directory, fitted=meta["fitted"] | {"n_models_": 3})
    _refused(directory, r"learned state does not fit: n_models_ 3 x 3 classes must equal its 6")


def test_save_error_leaves_previous_head(tmp_path):
    X, y = data_for("logreg")
    head = fast_head("logreg").fit(X, y)
    save_head(head, tmp_path, sidecar_for(head) | {"run": 1}, seed_refits=ONE)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = fast_head("logreg", C=0.1).fit(X, y)
    with pytest.raises(TypeError):
        save_head(other, tmp_path, sidecar_for(other) | {"run": {1, 2}}, seed_refits=ONE)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_load_names_the_broken_path(tmp_path):
    _refused(tmp_path, r"head\.safetensors")
    directory = _saved(tmp_path, "ridge")
    (directory / "head.json").write_text("{not json")
    _refused(directory, r"head\.json is not a head sidecar")
    (directory / "head.json").write_text(json.dumps({"head": "mlp"}))
    _refused(directory, r"head\.json is not a head sidecar: 'params' must be a mapping")
    directory = _saved(tmp_path, "ridge")
    _edit_json(directory, head="logreg")
    _refused(directory, r"its params do not make a head: .*'alpha'")


@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_saved_head_is_json_and_safetensors_only(name, tmp_path):
    X, y = data_for(name)
    head = fast_head(name, block_norm="l2", block_dims=[8, 16]).fit(X, y)
    save_head(head, tmp_path / "h", sidecar_for(head), seed_refits=ONE)
    files = sorted(p.name for p in (tmp_path / "h").iterdir())
    assert files == ["head.json", "head.safetensors", "seeds.json"]
    assert not list(tmp_path.glob(".*")), "no temporary folder is left beside the head"
    loaded, meta = load_head(tmp_path / "h")
    assert meta["params"]["block_norm"] == "l2" and meta["params"]["block_dims"] == [8, 16]
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    _edit_json(tmp_path / "h", params=meta["params"] | {"block_dims": [16, 8]})
    _refused(tmp_path / "h", r"block_dims \[16, 8\] differ from the backbones' dims \[8, 16\]")


def test_a_pickle_is_never_loaded(tmp_path):
    import pickle

    directory = _saved(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (directory / "head.safetensors").write_bytes(pickle.dumps(Payload()))
    _refused(directory, r"head\.safetensors is not a safetensors file")
    assert not marker.exists()
    (directory / "head.safetensors").unlink()
    (directory / "head.joblib").write_bytes(pickle.dumps(Payload()))
    _refused(directory, "pickles are not loaded")
    assert not marker.exists()
    assert make_head  # the registry the loader rebuilds heads from, never unpickling
