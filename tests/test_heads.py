"""Every registered head through the same contract checks, then head-specific behaviour.

Heads take every parameter from params.yaml (no defaults): `head_kwargs` builds them from
the project's file, as `defuse fuse` does.
"""

import numpy as np
import pytest
import torch
from conftest import head_kwargs
from sklearn.base import clone

from pipeline.errors import ConfigError, DataError
from pipeline.fusion.heads import (
    HEADS,
    INPUTS,
    Head,
    SeedRefits,
    by_input,
    list_heads,
    load_head,
    make_head,
    register_head,
    save_head,
)

N_CLASSES, N_MODELS = 3, 2
FAST = {"mlp": {"epochs": 5, "hidden": 16}}  # keep the common checks quick


def data_for(name, n=120, d=24, seed=0):
    """Learnable (n, d) features with class-dependent means; K * C logits for logits heads."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % N_CLASSES
    if HEADS[name].input == "logits":
        means = np.tile(2.0 * np.eye(N_CLASSES), N_MODELS)  # each model favours the true class
    else:
        means = rng.normal(0, 1.5, (N_CLASSES, d))
    X = rng.normal(size=(n, means.shape[1])) + means[y]
    return X.astype(np.float32), y


def fast_head(name, **params):
    return make_head(name, **head_kwargs(name, **{**FAST.get(name, {}), **params}))


def sidecar_for(head):
    """The keys a saved head's sidecar must hold, for ``head`` fitted on `_data`."""
    return {"backbones": ["a", "b"], "dims": [8, 16], "class_names": ["x", "y", "z"]}


@pytest.mark.parametrize("name", list_heads())
def test_contract(name, tmp_path):
    X, y = data_for(name)
    head = fast_head(name)
    assert head.fit(X, y) is head
    assert head.input in INPUTS
    proba = head.predict_proba(X)
    assert proba.shape == (len(X), N_CLASSES)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    pred = head.predict(X)
    assert set(pred) <= set(head.classes_)
    assert (pred == y).mean() > 0.6, "chance is 1/3 on learnable data"

    twin = clone(head)
    assert not hasattr(twin, "classes_") and twin.get_params() == head.get_params()
    np.testing.assert_array_equal(twin.fit(X, y).predict_proba(X), proba)  # reproducible
    assert head.set_params(**head.get_params()) is head

    save_head(head, tmp_path / name, sidecar_for(head), seed_refits=SeedRefits(0, (0,)))
    loaded, sidecar = load_head(tmp_path / name)
    np.testing.assert_array_equal(loaded.predict_proba(X), proba)
    assert sidecar["head"] == name and sidecar["backbones"] == ["a", "b"]
    assert sidecar["params"] == head.get_params()


@pytest.mark.parametrize("name", list_heads())
def test_every_parameter_comes_from_params_yaml(name):
    """No constructor defaults: a head built without its params.yaml entry is refused."""
    params = head_kwargs(name)
    assert set(params) == set(HEADS[name]._get_param_names())
    for missing in params:
        with pytest.raises(ConfigError, match=rf"lacks parameter\(s\) \['{missing}'\]"):
            make_head(name, **{k: v for k, v in params.items() if k != missing})


@pytest.mark.parametrize("name", list_heads())
def test_bad_input_is_named(name):
    X, y = data_for(name)
    head = fast_head(name)
    with pytest.raises(DataError, match="shape"):
        head.fit(X, y[:-1])
    with pytest.raises(DataError, match="empty"):
        head.fit(X[:0], y[:0])
    with pytest.raises(DataError, match="single class"):
        head.fit(X, np.zeros_like(y))
    X_nan = X.copy()
    X_nan[7, 1] = np.nan
    with pytest.raises(DataError, match=r"NaN.*first row 7"):
        head.fit(X_nan, y)
    head.fit(X, y)
    with pytest.raises(DataError, match="fitted on"):
        head.predict_proba(X[:, :-1])


def test_by_input_is_the_one_dispatch():
    kinds = {HEADS[name].input: by_input(HEADS[name], embeddings="E", logits="L") for name in HEADS}
    assert kinds == {"embeddings": "E", "logits": "L"}

    class Pixels(Head):
        input = "pixels"

    with pytest.raises(ConfigError, match=r"reads 'pixels'; allowed: \['embeddings', 'logits'\]"):
        register_head("pixels")(Pixels)
    assert "pixels" not in HEADS


def test_unknown_head_lists_registered():
    with pytest.raises(ConfigError, match="registered heads") as err:
        make_head("transformer")
    assert all(name in str(err.value) for name in list_heads())


def test_unknown_param_names_head_param_and_allowed():
    with pytest.raises(ConfigError, match=r"\['hiden'\] for head 'mlp'.*'hidden'"):
        make_head("mlp", hiden=256)


def test_bad_param_value_message():
    with pytest.raises(ConfigError) as err:
        make_head("logreg", **head_kwargs("logreg", C=-1))
    assert str(err.value) == (
        "The 'C' parameter of logreg must be a float in (0, inf). Got -1 instead."
    )
    X, y = data_for("mlp")
    with pytest.raises(ConfigError, match="'epochs' parameter of mlp must be an int >= 1"):
        fast_head("mlp").set_params(epochs=0).fit(X, y)  # checked again at fit


def test_mlp_keeps_the_best_val_epoch():
    rng = np.random.default_rng(1)  # random labels: memorising them makes val loss climb
    X, X_val = rng.normal(size=(60, 40)), rng.normal(size=(60, 40))
    y, y_val = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    head = fast_head(
        "mlp", hidden=64, epochs=15, patience=None, lr=1e-2, lr_final=1e-3, class_weighted=True
    ).fit(X, y, X_val, y_val)
    assert [h["epoch"] for h in head.history_] == list(range(1, 16))
    val_loss = [h["val_loss"] for h in head.history_]
    assert head.best_epoch_ == int(np.argmin(val_loss)) + 1 < 15
    weight = len(y) / (3 * np.bincount(y))[y_val]  # the class-weighted loss the head reports
    proba = head.predict_proba(X_val)[np.arange(len(y_val)), y_val]
    kept_loss = -(weight * np.log(proba)).sum() / weight.sum()
    assert kept_loss == pytest.approx(val_loss[head.best_epoch_ - 1], rel=1e-4)
    assert kept_loss < val_loss[-1]


def test_mlp_without_val_keeps_last_epoch_and_leaves_global_rng():
    X, y = data_for("mlp")
    state = torch.random.get_rng_state()
    head = fast_head("mlp", hidden=0, epochs=3).fit(X, y)
    assert torch.equal(state, torch.random.get_rng_state())
    assert head.best_epoch_ == 3 and head.history_[-1]["val_loss"] is None
    assert [type(m).__name__ for m in head.net_] == ["Dropout", "Linear"]
    other = fast_head("mlp", hidden=0, epochs=3, random_state=1).fit(X, y)
    assert not np.array_equal(other.predict_proba(X), head.predict_proba(X))


def test_mlp_lr_decays_from_lr_to_lr_final(monkeypatch):
    seen = []
    real = torch.optim.RMSprop.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.RMSprop, "step", step)
    X, y = data_for("mlp", n=60)
    fast_head("mlp", epochs=4, batch_size=60, lr=1e-2, lr_final=1e-4).fit(X, y)
    assert seen[0] == pytest.approx(1e-2) and seen[-1] == pytest.approx(1e-4)
    assert seen == sorted(seen, reverse=True) and len(seen) == 4


def test_late_is_mean_of_softmax():
    X = np.array([[1.0, 2.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 2.0, 0.0, 0.0]])
    softmax = lambda z: np.exp(z) / np.exp(z).sum()  # noqa: E731
    expected = [
        (softmax(np.array([1.0, 2, 3])) + 1 / 3) / 2,
        (softmax(np.array([0.0, 0, 5])) + softmax(np.array([2.0, 0, 0]))) / 2,
    ]
    head = make_head("late").fit(np.tile(X, (2, 1)), np.array([0, 1, 2, 0]))
    assert head.n_models_ == 2
    np.testing.assert_allclose(head.predict_proba(X), expected, rtol=1e-6)
    with pytest.raises(DataError, match="not a multiple of the 3 classes"):
        make_head("late").fit(np.tile(X, (2, 1))[:, :5], np.array([0, 1, 2, 0]))


def test_mlp_patience_stops_early_and_refit_params_repeat_the_choice():
    rng = np.random.default_rng(1)  # random labels: val loss climbs soon
    X, X_val = rng.normal(size=(60, 40)), rng.normal(size=(60, 40))
    y, y_val = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    head = fast_head("mlp", hidden=64, epochs=30, lr=1e-2, patience=2).fit(X, y, X_val, y_val)
    assert len(head.history_) == head.best_epoch_ + 2 < 30
    assert head.refit_params() == {"epochs": head.best_epoch_, "patience": None}


def test_block_scaler_modes():
    from sklearn.preprocessing import StandardScaler

    from pipeline.fusion.heads import BlockScaler

    rng = np.random.default_rng(0)
    X = np.hstack([100 * rng.normal(size=(50, 4)), rng.normal(size=(50, 12))]).astype(np.float32)
    np.testing.assert_array_equal(BlockScaler("none", [4, 12]).partial_fit(X).transform(X), X)
    std = BlockScaler("standardize", [4, 12]).partial_fit(X).transform(X)
    np.testing.assert_allclose(std, StandardScaler().fit_transform(X), atol=1e-5)
    streamed = BlockScaler("l2", [4, 12]).partial_fit(X[:20]).partial_fit(X[20:])
    Z = streamed.transform(X)
    np.testing.assert_allclose(Z, BlockScaler("l2", [4, 12]).partial_fit(X).transform(X), atol=1e-5)
    # every block carries the same total variance whatever its width: 8 / 4 and 8 / 12 per feature
    np.testing.assert_allclose(Z[:, :4].var(axis=0), 2.0, rtol=1e-4)
    np.testing.assert_allclose(Z[:, 4:].var(axis=0), 8 / 12, rtol=1e-4)
    unit = X.copy()
    unit[:, :4] *= 1000  # the scale of a backbone's activations does not matter after l2
    assert np.allclose(BlockScaler("l2", [4, 12]).partial_fit(unit).transform(unit), Z, atol=1e-4)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_heads_keep_the_sklearn_probabilities(n_classes):
    from sklearn.linear_model import LogisticRegression, RidgeClassifier

    from pipeline.fusion.heads import BlockScaler

    rng = np.random.default_rng(0)
    y = np.arange(90) % n_classes
    X = (rng.normal(size=(90, 6)) + y[:, None]).astype(np.float32)
    head = fast_head("logreg", C=0.5, max_iter=1000, block_norm="standardize").fit(X, y)
    Z = BlockScaler("standardize", None).partial_fit(X).transform(X)
    expected = LogisticRegression(C=0.5, max_iter=1000).fit(Z, y).predict_proba(Z)
    np.testing.assert_allclose(head.predict_proba(X), expected, atol=1e-6)
    ridge = fast_head("ridge", alpha=1.0, block_norm="standardize").fit(
        X, y
    )  # binary: a flat coef_
    expected = RidgeClassifier(alpha=1.0).fit(Z, y).predict(Z)
    np.testing.assert_array_equal(ridge.predict(X), expected)


def test_block_dims_must_add_up():
    X, y = data_for("logreg")
    with pytest.raises(
        DataError, match=r"block_dims \[10, 10\] add up to 20 features, but X has 24"
    ):
        fast_head("logreg", block_dims=[10, 10]).fit(X, y)
