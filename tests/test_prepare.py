import csv
import json

import pytest
from click.testing import CliRunner
from conftest import write_params

from stages.cli import main

FRACTIONS = ["--test-fraction", "0.25", "--val-fraction", "0.34"]


@pytest.fixture
def run(tmp_path):
    """Invoke `defuse prepare` with the project's params (elpv: options override) unless given."""
    project = write_params(tmp_path / "project.yaml")

    def invoke(*args, params=project):
        return CliRunner().invoke(main, ["prepare", "--params", str(params), *map(str, args)])

    return invoke


def test_prepare_folder(run, image_folder, tmp_path):
    root = image_folder({"scratch": 6, "dent": 7})
    out = tmp_path / "cache" / "manifest.csv"
    result = run("--source", "folder", "--root", root, *FRACTIONS, "--out", out)
    assert result.exit_code == 0, result.output
    assert "13 images, 2 classes from folder" in result.output
    assert "scratch" in result.output and "dent" in result.output
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and {r["split"] for r in rows} == {"train", "val", "test"}
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["params"]["test_fraction"] == 0.25 and meta["root"] == str(root)
    assert (out.parent / "skipped.csv").read_text() == "path,reason\n"  # always written


def test_classes_option_sets_label_order(run, image_folder, tmp_path):
    root = image_folder({"a": 6, "b": 6, "c": 6})
    out = tmp_path / "m.csv"
    result = run(
        "--source", "folder", "--root", root, "--classes", "c, a", *FRACTIONS, "--out", out
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.with_suffix(".json").read_text())["class_names"] == ["c", "a"]


def test_options_default_to_the_params_file(run, image_folder, tmp_path):
    root = image_folder({"a": 6, "b": 6})
    section = {"source": "folder", "root": str(root), "test_fraction": 0.25, "val_fraction": 0.34}
    params = write_params(tmp_path / "params.yaml", prepare={**section, "seed": 3})
    out = tmp_path / "m.csv"
    result = run("--out", out, params=params)
    assert result.exit_code == 0, result.output
    assert json.loads(out.with_suffix(".json").read_text())["params"]["seed"] == 3


def test_bad_image_fails_cleanly_and_writes_nothing(run, image_folder, tmp_path):
    root = image_folder({"a": 6, "b": 6})
    (root / "b" / "broken.jpg").write_text("not a jpeg")
    out = tmp_path / "cache" / "manifest.csv"
    result = run("--source", "folder", "--root", root, *FRACTIONS, "--out", out)
    assert result.exit_code == 1
    assert "b/broken.jpg: not an image" in result.output
    assert "Traceback" not in result.output
    assert not out.parent.exists()


def test_skip_mode_reports_and_lists(run, image_folder, tmp_path):
    root = image_folder({"a": 6, "b": 6})
    (root / "b" / "broken.jpg").write_text("not a jpeg")
    (root / "a" / "copy.png").write_bytes((root / "a" / "000.png").read_bytes())
    out = tmp_path / "m.csv"
    args = ("--source", "folder", "--root", root, *FRACTIONS, "--on-bad-image", "skip")
    result = run(*args, "--out", out)
    assert result.exit_code == 0, result.output
    assert "skipped 1 bad image(s)" in result.output
    assert "collapsed 1 duplicate image(s)" in result.output
    assert "a/000.png = a/copy.png" in result.output  # the warning, shown by the stage
    assert "b/broken.jpg" in (tmp_path / "skipped.csv").read_text()


def test_bad_parameter_is_a_clean_error(run, tmp_path):
    result = run("--source", "s3", "--out", tmp_path / "m.csv")
    assert result.exit_code == 1
    assert "'prepare.source' parameter must be one of ['elpv', 'folder']" in result.output


def test_a_missing_params_file_is_an_error_that_keeps_the_manifest(
    run, image_folder, tmp_path, monkeypatch
):
    """Without params.yaml nothing falls back to the ELPV default over a folder's manifest."""
    root = image_folder({"a": 6, "b": 6})
    out = tmp_path / "cache" / "manifest.csv"
    assert run("--source", "folder", "--root", root, *FRACTIONS, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    result = run("--out", out, params=tmp_path / "absent.yaml")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'absent.yaml'}: no such params file. Every stage reads its "
        "hyper-parameters from it: run from the project folder, or pass --params "
        "(pipeline/presets/ holds the papers')."
    ]
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the default --params is missing too
    result = CliRunner().invoke(main, ["prepare", "--out", str(out)])
    assert result.exit_code == 1 and "params.yaml: no such params file" in result.output
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before
