"""`defuse export`: one ONNX graph from each backbone's uint8 square to the head's
probabilities, with model.json saying what it was built from; other checkpoints and graphs
that disagree with torch are refused, and nothing is written then."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import head_kwargs, write_params

from pipeline import export as export_module
from pipeline import layout
from pipeline.config import BLOCK_NORMS
from pipeline.deploy import RUNTIME, prepared
from pipeline.errors import CheckpointError
from pipeline.export import export
from pipeline.fusion.heads import HEADS, load_head, make_head
from pipeline.models.checkpoint import load_checkpoint, read_record, save_checkpoint
from pipeline.storage.hashing import file_sha256
from stages.cli import main

REPO = Path(__file__).resolve().parents[1]

# Small, fast settings per head; every registered head must convert (a new one too).
QUICK = {"mlp": {"hidden": 8, "epochs": 3, "dropout": 0.0, "precision": "float32"}}
# fused_project fits logreg alone; final_head auto would look for every head of params.yaml
LOGREG = {"final_head": "logreg"}


def _treatments(name: str) -> list[str | None]:
    """Each block treatment a head takes, or None for a head without one."""
    return list(BLOCK_NORMS) if "block_norm" in HEADS[name]._get_param_names() else [None]


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize(
    ("name", "block_norm"), [(name, norm) for name in HEADS for norm in _treatments(name)]
)
def test_every_heads_torch_module_gives_its_predict_proba(name, block_norm, n_classes):
    rng = np.random.default_rng(0)
    y = np.arange(60) % n_classes
    X = rng.normal(size=(60, 8)) * np.array([1, 5, 1, 1, 9, 1, 1, 2])  # blocks of unlike scale
    X[np.arange(60), y] += 2.0
    X = X.astype(np.float32)
    params = head_kwargs(name, **QUICK.get(name, {}))
    if block_norm is not None:
        params |= {"block_norm": block_norm, "block_dims": [5, 3]}
    if HEADS[name].input == "logits":
        X = X[:, : (8 // n_classes) * n_classes]  # K models' logits side by side
    head = make_head(name, **params).fit(X, y)
    with torch.no_grad():
        got = head.torch_module().eval()(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(got, head.predict_proba(X), atol=1e-5)


@pytest.fixture(scope="module")
def exported(fused_project, tmp_path_factory):
    """`defuse export` of fused_project's logreg head through the CLI."""
    base = tmp_path_factory.mktemp("export")
    params = write_params(base / "params.yaml", evaluate=LOGREG, review={"below": 0.75})
    out = base / "export"
    result = CliRunner().invoke(main, [
        "export", "--params", str(params), "--heads", str(fused_project["heads"]),
        "--models", str(fused_project["models"]), "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"-> {out / 'model.onnx'}" in result.output
    return out


def test_the_record_says_what_the_graph_was_built_from(fused_project, exported):
    record = json.loads((exported / "model.json").read_text())
    head_dir = layout.head_dir("logreg", fused_project["heads"])
    _, sidecar = load_head(head_dir)
    assert record["classes"] == sidecar["class_names"] == ["clean", "crack", "scratch"]
    assert record["graph_sha256"] == file_sha256(exported / "model.onnx")
    assert [i["name"] for i in record["inputs"]] == sidecar["backbones"]
    for item in record["inputs"]:
        ckpt = read_record(layout.checkpoint_dir(item["name"], fused_project["models"]))
        assert item["preprocessing"] == json.loads(ckpt.preprocessing.to_json())
        assert item["preprocessing"]["input_size"] == 32
        assert record["built_from"]["checkpoints"][item["name"]] == ckpt.weights_sha256
    assert record["built_from"]["head"] == {
        f: file_sha256(head_dir / f) for f in ("head.json", "head.safetensors")
    }
    assert record["review_below"] == 0.75
    assert record["versions"]["onnxruntime"] == ort.__version__
    assert sorted(p.name for p in exported.iterdir()) == ["model.json", "model.onnx", "pipeline"]
    runtime = sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*.py"))
    assert runtime == sorted(RUNTIME)  # the runtime, unchanged, and nothing else
    assert all((exported / f).read_bytes() == (REPO / f).read_bytes() for f in RUNTIME)


def test_the_graph_gives_the_heads_probabilities_on_the_cached_test_rows(fused_project, exported):
    """The graph repeats extraction (TTA, float16 rounding) and the head with its temperature:
    from the squares of the test images it gives what the head gives from their cached
    features."""
    features, manifest = fused_project["features"], fused_project["manifest"]
    head, _ = load_head(layout.head_dir("logreg", fused_project["heads"]))
    test = np.flatnonzero(features.split == "test")
    record = json.loads((exported / "model.json").read_text())
    models = fused_project["models"]
    inputs = {
        i["name"]: read_record(layout.checkpoint_dir(i["name"], models)).preprocessing
        for i in record["inputs"]
    }
    squares = [
        prepared(manifest.image_path(int(r)), inputs, max_pixels=manifest.max_pixels) for r in test
    ]
    feed = {n: np.stack([s[n] for s in squares]) for n in inputs}  # batch of 9: not the traced 2
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["probabilities"], feed)
    assert got.shape == (len(test), 3)
    np.testing.assert_allclose(got, head.predict_proba(features.X[test]), atol=1e-4)
    raw = head.predict_proba(features.X[test], calibrated=False)
    assert head.temperature_ == 2.0 and np.abs(got - raw).max() > 1e-3


def test_a_checkpoint_other_than_the_pinned_one_is_refused(fused_project, tmp_path):
    models = shutil.copytree(fused_project["models"], tmp_path / "models")
    ckpt = layout.checkpoint_dir("tf_efficientnet_lite1", models)
    model, record = load_checkpoint(ckpt)
    with torch.no_grad():
        model.get_classifier().bias += 1.0  # fine-tuned again since the caches were extracted
    now = save_checkpoint(
        model, ckpt, dataclasses.replace(record, weights_sha256="")
    ).weights_sha256
    params = write_params(tmp_path / "params.yaml", evaluate=LOGREG)
    result = CliRunner().invoke(main, [
        "export", "--params", str(params), "--heads", str(fused_project["heads"]),
        "--models", str(models), "--out", str(tmp_path / "export"),
    ])  # fmt: skip
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f"but {ckpt} is checkpoint {now}" in result.output
    assert not (tmp_path / "export").exists()


def test_a_graph_that_disagrees_with_torch_is_refused_and_nothing_written(
    fused_project, tmp_path, monkeypatch
):
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.json").write_text("{}")  # a previous export stays as it was
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # no difference is small enough
    with pytest.raises(CheckpointError, match=r"model\.onnx: onnxruntime's probabilities differ"):
        export(
            layout.head_dir("logreg", fused_project["heads"]),
            fused_project["models"],
            out,
            max_pixels=fused_project["manifest"].max_pixels,
        )
    assert [p.name for p in out.parent.iterdir()] == ["export"]
    assert [p.name for p in out.iterdir()] == ["model.json"]
