"""The deployment runtime: an export classified with numpy, Pillow and onnxruntime in a
process where torch cannot be imported, giving `defuse predict`'s probabilities and review
flags; tampered exports and bad thresholds are refused naming the file or option."""

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import review_threshold
from PIL import Image

from pipeline import layout
from pipeline.deploy import FORMAT, load_export, main
from pipeline.errors import CheckpointError
from pipeline.export import export
from pipeline.predict import predict

# Runs the export folder's own pipeline.deploy (the working directory's, checked) with torch
# (and the other training libraries) unimportable.
NO_TORCH = """
import os, runpy, sys
BLOCKED = {"torch", "torchvision", "timm", "sklearn", "h5py", "safetensors"}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the runtime must not need it")
sys.meta_path.insert(0, Blocker())
import pipeline
assert pipeline.__file__.startswith(os.getcwd()), f"not the export's: {pipeline.__file__}"
sys.argv = ["pipeline.deploy", *sys.argv[1:]]
runpy.run_module("pipeline.deploy", run_name="__main__")
"""


@pytest.fixture(scope="module")
def images(fused_project, tmp_path_factory):
    """The test split's images, a grey non-square PNG, an RGB non-square JPEG, a text file."""
    manifest, folder = fused_project["manifest"], tmp_path_factory.mktemp("new")
    for row in manifest.indices("test")[:4]:
        shutil.copy(manifest.image_path(int(row)), folder / f"test{row}.png")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (40, 25, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def predicted(fused_project, images):
    """`defuse predict` on ``images`` with the head the export is made of."""
    return predict(
        [images],
        layout.head_dir("logreg", fused_project["heads"]),
        fused_project["extract"],
        fused_project["models"],
        progress=False,
        max_pixels=fused_project["manifest"].max_pixels,
    )


@pytest.fixture(scope="module")
def exported(fused_project, predicted, tmp_path_factory):
    """The export, its review_below between two of ``predicted``'s top probabilities."""
    out = tmp_path_factory.mktemp("deploy") / "export"
    export(
        layout.head_dir("logreg", fused_project["heads"]),
        fused_project["models"],
        out,
        max_pixels=fused_project["manifest"].max_pixels,
        review_below=review_threshold(predicted.proba)[0],
    )
    return out


def _deploy(export_dir: Path, *args) -> subprocess.CompletedProcess:
    """`python -m pipeline.deploy . *args` inside ``export_dir``, as on an inspection PC that
    has the export folder alone: the runtime is the copy in it, not this repository's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, ".", *map(str, args)],
        cwd=export_dir, env=env, capture_output=True, text=True,
    )  # fmt: skip


def test_the_runtime_without_torch_gives_predicts_probabilities_and_review_flags(
    predicted, exported, images, tmp_path
):
    below, n = review_threshold(predicted.proba)
    assert json.loads((exported / "model.json").read_text())["review_below"] == below
    done = _deploy(exported, images, "--out", tmp_path / "preds.csv", "--batch-size", 4)
    assert done.returncode == 0, done.stderr
    assert "notes.txt" in done.stderr and "6 image(s) classified" in done.stdout
    assert f"; {n} flagged for review (top probability < {below})" in done.stdout
    with open(tmp_path / "preds.csv") as fh:
        rows = list(csv.DictReader(fh))
    expected = replace(predicted, review_below=below).rows()
    assert [r["path"] for r in rows] == [r["path"] for r in expected]
    assert list(rows[0]) == list(expected[0])  # path, predicted, review, p_<class>...
    got = np.array([[float(r[f"p_{c}"]) for c in predicted.class_names] for r in rows])
    np.testing.assert_allclose(got, predicted.proba, atol=1e-4)
    for key in ("predicted", "review"):
        assert [r[key] for r in rows] == [str(r[key]) for r in expected]


def test_review_below_overrides_the_exports_threshold(predicted, exported, images, tmp_path):
    below = float(predicted.proba.max(axis=1).min()) / 2  # under every answer: none flagged
    done = _deploy(exported, images, "--out", tmp_path / "p.json", "--review-below", below)
    assert done.returncode == 0, done.stderr
    assert f"; 0 flagged for review (top probability < {below})" in done.stdout
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["review"] for r in rows] == [False] * 6


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--review-below", "0", "must be a probability in (0, 1]. Got 0.0."),
        ("--review-below", "1.5", "must be a probability in (0, 1]. Got 1.5."),
        ("--review-below", "-1", "must be a probability in (0, 1]. Got -1.0."),
        ("--batch-size", "0", "must be >= 1. Got 0."),
        ("--threads", "-2", "must be >= 1. Got -2."),
    ],
)
def test_a_bad_option_is_refused_naming_it(exported, images, tmp_path, capsys, option, value, says):
    assert main([str(exported), str(images), "--out", str(tmp_path / "p.csv"), option, value]) == 1
    assert capsys.readouterr().err == f"Error: {option} {says}\n"
    assert not (tmp_path / "p.csv").exists()


def _tampered(exported: Path, tmp_path: Path) -> Path:
    return shutil.copytree(exported, tmp_path / "export")


def test_a_swapped_graph_is_refused_naming_it(exported, tmp_path, images):
    copy = _tampered(exported, tmp_path)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(CheckpointError, match=r"model\.onnx: missing or not the graph"):
        load_export(copy)
    done = _deploy(copy, images, "--out", tmp_path / "p.csv")
    assert done.returncode == 1 and not (tmp_path / "p.csv").exists()
    assert done.stderr.count("\n") == 1 and "Error: model.onnx: missing" in done.stderr


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda r: r["inputs"][0]["preprocessing"].update(input_size=64), r": inputs differ"),
        (lambda r: r["inputs"][1]["preprocessing"].pop("resize"), r"preprocessing record has"),
        (lambda r: r["classes"].append("dent"), r": classes differ from the record .*model\.onnx"),
        (lambda r: r["classes"].reverse(), r": classes differ"),  # same count, other names
        (lambda r: r.update(max_pixels=r["max_pixels"] * 2), r": max_pixels differ"),
        (lambda r: r.update(review_below=0.123, head="x"), r": head, review_below differ"),
        (
            lambda r: r.update(format=FORMAT - 1),
            rf"format {FORMAT - 1}, this runtime reads {FORMAT}",
        ),
        (lambda r: r.update(review_below=1.5), r"review_below must be a probability in \(0, 1\]"),
        (lambda r: r.update(review_below=True), r"review_below True is not a number"),
    ],
)
def test_an_edited_record_is_refused_naming_it(exported, tmp_path, edit, says):
    copy = _tampered(exported, tmp_path)
    record = json.loads((copy / "model.json").read_text())
    edit(record)
    (copy / "model.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=says) as err:
        load_export(copy)
    assert str(err.value).startswith(f"{copy / 'model.json'}")


def test_openvino_gives_onnxruntimes_probabilities(exported, fused_project):
    ov = pytest.importorskip("openvino", reason="openvino is not installed (optional)")
    deployed = load_export(exported)
    rng = np.random.default_rng(0)
    feed = {n: rng.integers(0, 256, (3, p.input_size, p.input_size, 3), dtype=np.uint8)
            for n, p in deployed.inputs.items()}  # fmt: skip
    expected = deployed.session.run([deployed.output], feed)[0]
    # OpenVINO computes in bf16 where the CPU has it (1e-2 off); in f32 its kernels sum in
    # another order than onnxruntime's, 1-3e-4 off after the backbones
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(str(exported / "model.onnx"), "CPU", config)
    got = compiled(feed)[compiled.output(0)]
    np.testing.assert_allclose(got, expected, atol=1e-3)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
