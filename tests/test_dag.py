"""The real DVC DAG end to end, in a temporary git + DVC repo on a tiny synthetic image folder:
a full repro, a no-op repro, a head-parameter change that reruns only fusion, a training one
that decodes nothing again, and the owner's commit and push cloned and pulled by a teammate
whose workspace is then up to date (nothing reruns) and who fuses without re-extracting."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import head_entry, write_params

from pipeline import layout

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e

# Laid over the project's params.yaml (conftest.full_params): the file must be complete.
PARAMS = {
    "prepare": {
        "source": "folder",
        "root": "images",
        "test_fraction": 0.25,
        "val_fraction": 0.25,
        "seed": 0,
    },
    "finetune": {
        "epochs": 1,
        "batch_size": 8,
        "eval_batch_size": 16,
        "pretrained": False,
        "num_workers": 0,
        "input_size": 32,
    },
    "backbones": {"tf_efficientnet_lite0": {"family": "efficientnet_lite", "frozen_stages": 0}},
    "extract": {"batch_size": 16, "num_workers": 0},
    "fuse": {"seed": 0, "seeds": [0, 1]},
    "heads": {
        "mlp": head_entry("mlp", epochs=3, hidden=16),
        "logreg": head_entry("logreg", C=1.0),
        "late": {},
    },
    "evaluate": {"final_head": "auto"},
    "review": {"defect_free": ["clean"]},
}


def _run(args, cwd, check=True) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout + done.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _git(cwd, *args):
    return _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd)


@pytest.fixture
def project(tmp_path, image_folder):
    root = tmp_path / "project"
    root.mkdir()
    for item in ("dvc.yaml", ".gitignore", ".dvcignore", "pipeline", "stages"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    image_folder({"crack": 12, "scratch": 12, "clean": 12}, root=root / "images", size=24)
    write_params(root / "params.yaml", **PARAMS)
    _git(root, "init", "-q")
    _run([BIN / "dvc", "init", "-q"], root)
    _run([BIN / "dvc", "config", "core.analytics", "false"], root)
    return root


def test_dag_reruns_only_what_changed_and_shares_caches(project, tmp_path):
    dvc = BIN / "dvc"
    first = _run([dvc, "repro"], project)
    assert _ran(first) >= {
        "prepare",
        "decode@tf_efficientnet_lite0",
        "finetune@tf_efficientnet_lite0",
        "extract@tf_efficientnet_lite0",
        "fuse@mlp",
        "fuse@logreg",
        "evaluate",
    }
    assert (project / "reports/summary.md").is_file()
    assert (project / "reports/figures/confusion_mlp.png").is_file()

    assert _ran(_run([dvc, "repro"], project)) == set()  # nothing changed: nothing runs

    cache = project / layout.feature_cache("tf_efficientnet_lite0")
    before = (cache.stat().st_mtime_ns, cache.read_bytes())
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["heads"]["logreg"]["C"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # final_head auto: any head's val scores may change the final head, so export reruns
    assert _ran(_run([dvc, "repro"], project)) == {"fuse@logreg", "evaluate", "export"}
    assert (cache.stat().st_mtime_ns, cache.read_bytes()) == before

    # A training parameter reruns fine-tuning on the decoded images, never their decoding.
    trained = {**params, "finetune": {**params["finetune"], "lr": 5.0e-4}}
    (project / "params.yaml").write_text(yaml.safe_dump(trained, sort_keys=False))
    status = _run([dvc, "status"], project)
    assert "finetune@tf_efficientnet_lite0:" in status and "decode@" not in status, status
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    images = project / layout.image_cache("tf_efficientnet_lite0")
    assert "OK" in _run([BIN / "defuse", "cache", "verify", str(images)], project)

    # Share through git and a local DVC remote: a fresh clone is up to date once pulled.
    remote = tmp_path / "remote"
    _run([dvc, "remote", "add", "-d", "team", str(remote)], project)
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "run")
    _run([dvc, "push"], project)
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(project), str(clone))
    assert (clone / "reports/summary.md").is_file()  # text reports travel in git,
    assert not (clone / "reports/figures").exists()  # pictures and caches through DVC
    _run([dvc, "pull"], clone)
    assert "up to date" in _run([dvc, "status"], clone)
    assert _ran(_run([dvc, "repro"], clone)) == set()
    assert "OK" in _run([BIN / "defuse", "cache", "verify", str(cache.relative_to(project))], clone)
    params["heads"]["logreg"]["C"] = 2.0
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run([dvc, "repro"], clone)) == {"fuse@logreg", "evaluate", "export"}
