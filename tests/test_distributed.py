"""Real torchrun runs: 2 CPU processes (gloo) fine-tune and extract on tiny images and match
one process; the checks on torchrun's environment run in this process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import checkpoint_for, make_manifest, tinted_folder, write_params
from safetensors.torch import load_file

from pipeline import distributed
from pipeline.config import ExtractParams, finetune_params, section
from pipeline.errors import ConfigError
from pipeline.extract import extract
from pipeline.finetune import finetune
from pipeline.models.checkpoint import SIDECAR, WEIGHTS
from pipeline.runtime import resolve_device

BACKBONE = "tf_efficientnet_lite0"
# BatchNorm in a trained stage normalises each process's half batch by itself, which two
# processes cannot match; with all 7 stages frozen (every BatchNorm on its running statistics)
# only DDP itself is compared. Augmentation and dropout off: they draw per process.
PARAMS = {
    "finetune": {
        "epochs": 2,
        "batch_size": 8,  # global: 4 per process
        "eval_batch_size": 4,  # 7 val rows: rank 0 runs batches 0 and 2, rank 1 batch 1
        "pretrained": False,
        "num_workers": 0,
        "input_size": 32,
        "seed": 0,
        "frozen_stages": 7,
        "dropout": 0.0,
        "hflip": False,
        "vflip": False,
        "rotation": 0,
        "color_jitter": 0,
        "class_weighted": False,
    },
    "backbones": {BACKBONE: {"input_size": 32}},
    "extract": {"batch_size": 4, "num_workers": 0},
}


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 defuse ARGS` in ``cwd``, one thread each."""
    defuse = Path(sys.executable).with_name("defuse")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", "--no-python", str(defuse), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A 3-class folder (20 train rows: no sampler padding) fine-tuned by 2 processes."""
    base = tmp_path_factory.mktemp("ddp")
    root = tinted_folder(base / "images", {"crack": 12, "scratch": 12, "clean": 12})
    manifest = make_manifest(root, base / "cache" / "manifest.csv")
    write_params(base / "params.yaml", **PARAMS)
    run = _torchrun(
        *("finetune", BACKBONE, "--params", "params.yaml", "--manifest", "cache/manifest.csv"),
        *("--out", "models/ddp", "--reports", "reports"),
        cwd=base,
    )
    assert run.returncode == 0, run.stderr
    return {"base": base, "root": root, "manifest": manifest, "run": run}


def test_two_processes_train_what_one_does(ddp_run, one_thread, tmp_path):
    base, manifest = ddp_run["base"], ddp_run["manifest"]
    assert len(manifest.indices("train")) % 2 == 0
    params = finetune_params(BACKBONE, base / "params.yaml")
    one = finetune(manifest, BACKBONE, params, tmp_path / "one", progress=False)

    history = (base / "reports" / "plots" / f"history_{BACKBONE}.csv").read_text().splitlines()
    assert len(history) == 1 + len(one.history)
    for line, row in zip(history[1:], one.history, strict=True):
        got = dict(zip(history[0].split(","), map(float, line.split(",")), strict=True))
        del got["train_s"], row["train_s"]  # wall time: the one column that may differ
        assert got == pytest.approx(row, abs=2e-6)
    ddp_sidecar = json.loads((base / "models" / "ddp" / SIDECAR).read_text())
    assert ddp_sidecar["best_epoch"] == one.record.best_epoch
    assert (ddp_sidecar["world_size"], one.record.world_size) == (2, 1)
    a, b = load_file(base / "models" / "ddp" / WEIGHTS), load_file(tmp_path / "one" / WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    metrics = json.loads((base / "reports" / "metrics" / f"finetune_{BACKBONE}.json").read_text())
    assert metrics["test"]["accuracy"] == pytest.approx(one.test_metrics["accuracy"])
    assert ddp_run["run"].stdout.count("best epoch") == 1  # rank 0 alone reports
    assert sorted(p.name for p in (base / "models").iterdir()) == ["ddp"]


def test_sharded_extraction_is_byte_identical_and_reuses_rows(ddp_run, one_thread, tmp_path):
    base, manifest = ddp_run["base"], ddp_run["manifest"]
    checkpoint = base / "models" / "ddp"
    params = section(ExtractParams, "extract", base / "params.yaml")
    # An earlier cache of 6 images per class: 18 scattered rows are new, 5 batches of 4 (the
    # last one short): rank 0 runs 3, rank 1 runs 2.
    some = shutil.copytree(ddp_run["root"], tmp_path / "some")
    for path in some.rglob("*.png"):
        if int(path.stem) >= 6:
            path.unlink()
    earlier, fewer = tmp_path / "earlier.h5", make_manifest(some, tmp_path / "some.csv")
    same_weights = checkpoint_for(checkpoint, fewer, tmp_path / "ckpt")  # see test_features
    extract(fewer, same_weights, earlier, params, False)
    for name in ("ddp", "one"):
        (tmp_path / name).mkdir()
        shutil.copy(earlier, tmp_path / name / "f.h5")

    run = _torchrun(
        *("extract", BACKBONE, "--params", "params.yaml", "--manifest", "cache/manifest.csv"),
        *("--checkpoint", str(checkpoint), "--out", str(tmp_path / "ddp" / "f.h5")),
        cwd=base,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("36 rows (18 computed, 18 reused)") == 1
    one = extract(manifest, checkpoint, tmp_path / "one" / "f.h5", params, progress=False)
    assert (one.n_new, one.n_reused) == (18, 18)
    assert (tmp_path / "ddp" / "f.h5").read_bytes() == (tmp_path / "one" / "f.h5").read_bytes()
    assert [p.name for p in (tmp_path / "ddp").iterdir()] == ["f.h5"]  # no shard left


def test_a_failing_process_stops_both_and_leaves_no_file(ddp_run, tmp_path):
    root = shutil.copytree(ddp_run["root"], tmp_path / "images")
    manifest = make_manifest(root, tmp_path / "manifest.csv")
    victim = manifest.image_path(5)  # in batch 1 of 4 rows: rank 1's
    victim.write_bytes(victim.read_bytes()[:40])
    out = tmp_path / "features" / "f.h5"
    run = _torchrun(
        *("extract", BACKBONE, "--params", "params.yaml", "--manifest", str(manifest.path)),
        *("--checkpoint", "models/ddp", "--out", str(out)),
        cwd=ddp_run["base"],
    )
    assert run.returncode != 0
    assert f"{victim}: not an image" in run.stderr  # rank 1's own error
    assert "rank(s) [1] failed" in run.stderr  # rank 0 stops instead of waiting
    assert list(out.parent.iterdir()) == []


def test_global_batch_must_divide_among_the_processes(ddp_run, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    params = finetune_params(BACKBONE, ddp_run["base"] / "params.yaml")
    with pytest.raises(ConfigError, match=r"finetune.batch_size=8 .* 3 processes"):
        finetune(ddp_run["manifest"], BACKBONE, params, ddp_run["base"] / "x", progress=False)


def test_torchrun_environment_is_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK or LOCAL_RANK is not set"):
        distributed.world()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="RANK=2"):
        distributed.world()
    monkeypatch.setenv("RANK", "1")
    assert distributed.world() == distributed.World(rank=1, size=2, local_rank=0)
    with pytest.raises(ConfigError, match="'cuda:1' names one GPU for all 2 processes"):
        resolve_device("cuda:1")


@pytest.mark.parametrize(("n", "batch", "size"), [(0, 4, 2), (7, 4, 2), (26, 4, 2), (9, 2, 3)])
def test_batch_shards_are_whole_batches_covering_every_row_once(n, batch, size):
    shards = [distributed.batch_shard(n, batch, rank, size) for rank in range(size)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(n))
    for rank, shard in enumerate(shards):
        assert set(shard // batch) == set(range(rank, -(-n // batch), size))
