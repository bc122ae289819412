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
    assert "'prepare.source' parameter must be one of ['elpv', 'folder', 'csv']" in result.output


def test_prepare_csv_with_patterns_from_the_command_line(run, image_folder, tmp_path):
    root = image_folder({"a": 6, "b": 6})
    (root / "a" / "000.txt").write_text("notes kept beside an image")
    rows = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*.*"))]
    (root / "labels.csv").write_text(
        "path,label\n" + "".join(f"{p},{p.split('/')[0]}\n" for p in rows)
    )
    out = tmp_path / "m.csv"
    args = ("--source", "csv", "--labels", root / "labels.csv", *FRACTIONS, "--out", out)
    result = run(*args, "--include", "*.png, *.jpg")
    assert result.exit_code == 0, result.output
    assert "12 images, 2 classes from csv" in result.output
    assert json.loads(out.with_suffix(".json").read_text())["params"]["include"] == [
        "*.png",
        "*.jpg",
    ]
    result = run(*args)  # the .txt is a bad image now
    assert result.exit_code == 1 and "a/000.txt: not an image" in result.output


def test_summary_lists_the_near_duplicate_groups(run, image_folder, tmp_path):
    from PIL import Image

    root = image_folder({"a": 6, "b": 6}, size=64)
    image = Image.open(root / "a" / "002.png")
    image.resize((48, 48)).save(root / "b" / "copy.jpg", quality=70)
    out = tmp_path / "m.csv"
    result = run("--source", "folder", "--root", root, *FRACTIONS, "--out", out)
    assert result.exit_code == 0, result.output
    assert "1 near-duplicate group(s), 2 images (pHash within 4 bits)" in result.output
    assert "a/002.png, b/copy.jpg" in result.output
    assert "warning: 1 near-duplicate group(s) (pHash within 4 bits) span classes" in result.output


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"source": "csv"}, "prepare.labels must name the labels file"),
        ({"source": "csv", "labels": "l.csv", "root": "x"}, "prepare.root must be null"),
        ({"source": "folder", "root": "x", "labels": "l.csv"}, "prepare.labels is for"),
        ({"include": ["*.png"]}, "prepare.include is for the folder and csv sources"),
        ({"source": "folder", "root": "x", "exclude": "*.png"}, "prepare.exclude must be a list"),
        ({"source": "folder", "root": "x", "exclude": [""]}, "must be a list of glob"),
        ({"near_duplicate_bits": 32}, "must be null (off) or an int in [0, 32). Got 32"),
        ({"near_duplicate_bits": True}, "prepare.near_duplicate_bits must be"),
    ],
)
def test_bad_user_data_params_are_clean_errors(run, tmp_path, section, message):
    params = write_params(tmp_path / "params.yaml", prepare=section)
    result = run("--out", tmp_path / "m.csv", params=params)
    assert result.exit_code == 1 and message in result.output, result.output


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


def test_image_check_progress_is_a_few_plain_lines_off_a_terminal(run, image_folder, tmp_path):
    root = image_folder({"a": 10, "b": 10})
    result = run("--source", "folder", "--root", root, *FRACTIONS, "--out", tmp_path / "m.csv")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("checking images")]
    assert lines[-1].startswith("checking images: 20/20 img (100 %)")
    assert 2 <= len(lines) <= 10  # about one per 10 %, no bar redrawn per image
    assert "\r" not in result.stderr
