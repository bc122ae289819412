"""The `defuse` command group: help, and library errors as one clean line with exit code 1."""

import json
import os

import pytest
from click.testing import CliRunner
from conftest import head_entry, write_params

from pipeline import layout
from stages.cli import COMMANDS, main


def test_help_lists_every_stage_in_dag_order():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    positions = [result.output.index(f"  {name} ") for name in COMMANDS]
    assert positions == sorted(positions)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_explains_itself(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) > 3


def test_library_errors_are_one_line_and_exit_1(tmp_path):
    result = CliRunner().invoke(
        main, ["finetune", "resnet50", "--manifest", str(tmp_path / "missing.csv")]
    )
    assert result.exit_code == 1
    assert (
        "Error: " in result.output
        and "missing" in result.output
        and "defuse prepare" in result.output
    )
    assert "Traceback" not in result.output


def test_unknown_param_key_is_named(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  sourse: elpv\n")
    result = CliRunner().invoke(
        main, ["prepare", "--params", str(params), "--out", str(tmp_path / "m.csv")]
    )
    assert result.exit_code == 1 and "sourse" in result.output


@pytest.mark.parametrize(
    ("stage", "text", "says"),
    [
        ("finetune", {"finetune": {"epochs": "three"}}, "finetune.epochs must be an int; got 'three'"),
        ("finetune", {"finetune": {"epochs": 1.5}}, "finetune.epochs must be an int; got 1.5"),
        ("finetune", {"finetune": {"device": "gpu"}}, "finetune.device must be 'auto', 'cpu', 'cuda'"),
        ("finetune", {"finetune": {"lr": "fast"}}, "finetune.lr must be a number; got 'fast'"),
        ("finetune", {"finetune": {"pretrained": "false"}}, "finetune.pretrained must be true or false"),
        ("extract", {"extract": {"tta": "false"}}, "extract.tta must be true or false"),
        ("evaluate", {"evaluate": {"final_head": "mpl"}}, "evaluate.final_head is 'mpl', not an entry"),
        ("predict", {"evaluate": {"final_head": "mpl"}}, "evaluate.final_head is 'mpl', not an entry"),
        ("finetune", "finetune:\n  epochs: [3\n", "not valid YAML at line 3"),
        ("extract", "extract: [64]\n", "section 'extract' must be a mapping of keys; got [64]"),
        ("prepare", "finetun: {}\n", "unknown section(s) ['finetun'] (did you mean 'finetune'?)"),
        ("fuse", None, "no such params file"),
    ],
)  # fmt: skip
def test_bad_params_are_one_clean_line_and_exit_1(tmp_path, stage, text, says):
    path = tmp_path / "params.yaml"
    if isinstance(text, dict):
        write_params(path, **text)
    elif text is not None:
        path.write_text(text)
    args = {"finetune": ["finetune", "tf_efficientnet_lite0"], "extract": ["extract", "x"],
            "fuse": ["fuse", "logreg"], "predict": ["predict", str(tmp_path)]}.get(stage, [stage])  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--params", str(path)])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith(f"Error: {path}: ")
    assert says in result.output


def test_finetune_extract_fuse_evaluate_predict_through_the_cli(tiny_run, tmp_path, monkeypatch):
    """The stages glue the library together: one pass on the tiny run, in a scratch folder."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_run["base"] / "cache", "cache")
    shutil.copytree(tiny_run["checkpoint"], "cache/models/tf_efficientnet_lite0")
    write_params(
        tmp_path / "params.yaml",
        backbones={"tf_efficientnet_lite0": {"input_size": 32}},
        extract={"batch_size": 16, "num_workers": 0},
        fuse={"seeds": [0]},
        heads={"logreg": head_entry("logreg", C=1.0), "late": {}},
        evaluate={"final_head": "auto"},
        review={"defect_free": ["clean"]},
    )
    run = CliRunner().invoke
    result = run(main, ["extract", "tf_efficientnet_lite0"])
    assert result.exit_code == 0, result.output  # no image cache yet: said, then decoded
    assert "No image cache cache/images/tf_efficientnet_lite0.h5: decoding every" in result.output
    for args in (
        ["decode", "tf_efficientnet_lite0", "--workers", "1"],
        ["extract", "tf_efficientnet_lite0"],
        ["fuse", "logreg"],
        ["fuse", "late"],
        ["evaluate"],
    ):
        result = run(main, args)
        assert result.exit_code == 0, (args, result.output)
        assert "No image cache" not in result.output
    metrics = json.loads((tmp_path / "reports/metrics/test.json").read_text())
    assert set(metrics) == {"tf_efficientnet_lite0", "logreg", "late"}
    final = json.loads((tmp_path / "reports/metrics/decisions.json").read_text())["final_head"]
    assert f"Final head: {final['name']} (best on val)" in result.output

    caches = ["cache/features/tf_efficientnet_lite0.h5", "cache/images/tf_efficientnet_lite0.h5"]
    result = run(main, ["cache", "verify", *caches])
    assert result.exit_code == 0 and result.output.count("OK") == 2, result.output
    result = run(main, ["cache", "info", caches[1]])
    assert result.exit_code == 0 and "consistent with manifest" in result.output
    assert '"resize": "stretch"' in result.output and '"input_size": 32' in result.output

    images = tiny_run["root"] / "crack"
    (tmp_path / "new").mkdir()
    shutil.copy(images / "000.png", tmp_path / "new" / "a.png")
    (tmp_path / "new" / "notes.txt").write_text("not an image")
    result = run(main, ["predict", "new", "--out", "pred.csv"])
    assert result.exit_code == 0, result.output
    assert f"classified with head {final['name']!r}" in result.output  # auto: the same head
    rows = (tmp_path / "pred.csv").read_text().splitlines()
    assert rows[0] == "path,predicted,p_clean,p_crack,p_scratch" and len(rows) == 2
    assert "notes.txt" in result.output  # reported, not fatal


def test_cache_verify_reports_a_killed_writers_file_as_fail(tmp_path):
    from conftest import killed_cache_writer

    path = tmp_path / "f.h5"
    killed_cache_writer(path).rename(path)
    result = CliRunner().invoke(main, ["cache", "verify", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"FAIL {path}\n     - {path}: unreadable feature cache" in result.output


def _tree(root):
    return {str(p.relative_to(root)): p.is_dir() or p.read_bytes() for p in root.rglob("*")}


def _refused(args, says):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("Error: "), result.output
    assert says in result.output, result.output


def test_outputs_that_hold_something_else_are_refused_and_left_alone(tmp_path, monkeypatch):
    """`--out cache/heads` once deleted every other head; `--out .` replaced the project;
    `--out notes.txt` turned a file into a folder. Each is refused before any work."""
    monkeypatch.chdir(tmp_path)
    for name in ("logreg", "mlp"):
        (tmp_path / "cache/heads" / name).mkdir(parents=True)
        (tmp_path / "cache/heads" / name / "head.json").write_text("{}")
        (tmp_path / "cache/heads" / name / "head.safetensors").write_bytes(b"weights")
    (tmp_path / "cache/models/lite0").mkdir(parents=True)
    (tmp_path / "cache/models/lite0/notes.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    params = str(write_params(tmp_path / "params.yaml"))
    before = _tree(tmp_path)
    _refused(["fuse", "logreg", "--out", "cache/heads"], "holds logreg, mlp, not a head")
    _refused(["fuse", "logreg", "--out", "."], "--out .: holds cache, notes.txt, params.yaml")
    _refused(["fuse", "logreg", "--out", "notes.txt"], "notes.txt: a file, not a folder")
    _refused(["finetune", "lite0", "--out", "cache/models/lite0"], "notes.txt, not a checkpoint")
    _refused(
        ["finetune", "lite0", "--out", "new", "--reports", "notes.txt"],
        "notes.txt: a file, not a folder",
    )
    _refused(["evaluate", "--reports", "notes.txt"], "notes.txt: a file, not a folder")
    _refused(["prepare", "--params", params, "--out", "cache"], "cache: a folder, not a file")
    _refused(["decode", "lite0", "--out", "cache"], "cache: a folder, not a file")
    _refused(["extract", "lite0", "--out", "notes.txt/x.h5"], "notes.txt is a file, not a folder")
    _refused(["predict", "notes.txt", "--out", "notes.txt/p.csv"], "notes.txt is a file")
    assert _tree(tmp_path) == before


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary(
    image_folder, tmp_path, monkeypatch
):
    import errno
    import os

    root = image_folder({"a": 6, "b": 6})
    params = write_params(
        tmp_path / "params.yaml",
        prepare={"source": "folder", "root": str(root), "val_fraction": 0.34},
    )
    out = tmp_path / "cache" / "manifest.csv"

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src), None, str(dst))

    monkeypatch.setattr(os, "replace", full)
    result = CliRunner().invoke(main, ["prepare", "--params", str(params), "--out", str(out)])
    assert result.exit_code == 1
    # skipped.csv is the first of the three files renamed into place
    said = f"Error: {out.with_name('skipped.csv')}: No space left on device [ENOSPC]."
    assert result.output.splitlines()[-1] == said
    assert list(out.parent.iterdir()) == []  # no manifest, no temporary file


def test_cache_verify_fails_a_fifo_and_a_tampered_cache_in_one_line_each(tmp_path):
    import h5py
    import numpy as np
    from conftest import feature_attrs

    from pipeline.storage.feature_cache import CacheWriter

    fifo, tampered = tmp_path / "fifo.h5", tmp_path / "f.h5"
    os.mkfifo(fifo)
    with CacheWriter(tampered, 2, 4, feature_attrs()) as w:
        w.write(0, np.ones((2, 4)), np.ones((2, 3)), ["a" * 64, "b" * 64], [0, 1], [0, 1])
    with h5py.File(tampered, "r+") as f:
        f["embeddings"][1, 2] = 0.5
    args = ["cache", "verify", str(fifo), str(tampered), "--manifest", str(tmp_path / "none")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"FAIL {fifo}\n     - {fifo}: not a regular file" in result.output
    assert (
        f"FAIL {tampered}\n     - {tampered}: dataset 'embeddings' does not match its stored "
        "sha256 digest" in result.output
    )


def test_demo_headline_gives_the_final_heads_gain_and_what_a_5_percent_review_buys(tmp_path):
    from stages.demo import _headline

    paths = layout.evaluate_reports(tmp_path)
    paths["decisions"].parent.mkdir(parents=True)
    rows = [
        {"rate": rate, "reviewed": n, "review_below": p, "accuracy_kept": acc,
         "defective_passed": k, "defective_passed_rate": share}
        for rate, n, p, acc, k, share in ((0.0, 0, 0.41, 0.8, 20, 0.1), (0.05, 33, 0.62, 0.83, 12, 0.06))
    ]  # fmt: skip
    paths["decisions"].write_text(json.dumps({
        "final_head": {"name": "ridge", "auto": True, "select_by": "accuracy"},
        "review": {"models": {"ridge": rows}},
    }))  # fmt: skip
    comparison = {"accuracy_diff": 0.0183, "accuracy_ci": [0.003, 0.0335]}
    paths["evidence"].write_text(
        json.dumps({"vs_best_single": {"best_single": "lite2", "heads": {"ridge": comparison}}})
    )
    with CliRunner().isolation() as (out, _, _):
        _headline(paths)
    assert out.getvalue().decode().splitlines() == [
        "Final head ridge (best val accuracy): +1.83 accuracy points over lite2 [95 % CI +0.30, +3.35]",
        "Reviewing the least sure 5 % (33 images, top probability below 0.620): accuracy on the "
        "rest 80.00 -> 83.00 %, defective parts passed as good 10.00 -> 6.00 %",
    ]
