"""The deployment runtime: an export classified with numpy, Pillow and onnxruntime in a
process where torch cannot be imported, giving `defuse predict`'s probabilities; tampered
exports are refused naming the file."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import layout
from pipeline.deploy import load_export
from pipeline.errors import CheckpointError
from pipeline.export import export
from pipeline.predict import predict

REPO = Path(__file__).resolve().parents[1]
# Runs pipeline.deploy with torch (and the other training libraries) unimportable.
NO_TORCH = """
import runpy, sys
BLOCKED = {"torch", "torchvision", "timm", "sklearn", "h5py", "safetensors"}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the runtime must not need it")
sys.meta_path.insert(0, Blocker())
sys.argv = ["pipeline.deploy", *sys.argv[1:]]
runpy.run_module("pipeline.deploy", run_name="__main__")
"""


@pytest.fixture(scope="module")
def exported(fused_project, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "export"
    export(
        layout.head_dir("logreg", fused_project["heads"]),
        fused_project["models"],
        out,
        max_pixels=fused_project["manifest"].max_pixels,
    )
    return out


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


def _deploy(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *map(str, args)], env=env, capture_output=True, text=True
    )


def test_the_runtime_without_torch_gives_predicts_probabilities(
    fused_project, exported, images, tmp_path
):
    done = _deploy(exported, images, "--out", tmp_path / "preds.csv", "--batch-size", 4)
    assert done.returncode == 0, done.stderr
    assert "notes.txt" in done.stderr and "6 image(s) classified" in done.stdout
    with open(tmp_path / "preds.csv") as fh:
        rows = list(csv.DictReader(fh))
    expected = predict(
        [images],
        layout.head_dir("logreg", fused_project["heads"]),
        fused_project["extract"],
        fused_project["models"],
        progress=False,
        max_pixels=fused_project["manifest"].max_pixels,
    )
    assert [r["path"] for r in rows] == [r["path"] for r in expected.rows()]
    assert list(rows[0]) == list(expected.rows()[0])  # path, predicted, p_<class>...
    got = np.array([[float(r[f"p_{c}"]) for c in expected.class_names] for r in rows])
    np.testing.assert_allclose(got, expected.proba, atol=1e-4)
    assert [r["predicted"] for r in rows] == [r["predicted"] for r in expected.rows()]


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
    assert done.stderr.count("\n") == 1 and f"{copy / 'model.onnx'}: missing" in done.stderr


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda r: r["inputs"][0]["preprocessing"].update(input_size=64), r"graph takes"),
        (lambda r: r["inputs"][1]["preprocessing"].pop("resize"), r"preprocessing record has"),
        (lambda r: r["classes"].append("dent"), r"and 4 classes"),
        (lambda r: r.update(format=2), r"format 2, this runtime reads 1"),
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
    compiled = ov.Core().compile_model(
        str(exported / "model.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    got = compiled(feed)[compiled.output(0)]
    np.testing.assert_allclose(got, expected, atol=1e-4)
