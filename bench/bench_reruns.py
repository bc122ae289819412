"""DVC reruns on a finished project: a no-op `dvc repro`, and a head-parameter change.

Run: .venv/bin/python bench/bench_reruns.py [--project .] [--smoke]
The project must have run the DAG to the end (`make demo`); --smoke makes a toy one instead
(two `fuse@<head>` stages and `evaluate` that copy files, in seconds). It is copied to a temp folder
(its .venv left out) so nothing of yours changes; one `dvc repro` settles DVC's file-state
database after the copy, then: a no-op `dvc repro` (target < 3 s) and `dvc repro` after
halving every value of `heads.logreg.C` (target < 30 s; only fuse@logreg and evaluate may
run). Prints
`<what>: <measured> s / <limit> s = <ratio>` (under 1 meets the target).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def repro(project: Path) -> tuple[float, list[str]]:
    """Wall seconds of `dvc repro` and the stages it ran."""
    start = time.perf_counter()
    done = _dvc(["repro"], project)
    return time.perf_counter() - start, re.findall(r"Running stage '([^']+)'", done.stdout)


# A DAG of the real one's shape whose stages copy params.yaml: a head's change reruns it
# and evaluate, not the other head.
_TOY_DVC = """\
stages:
  fuse:
    foreach: ${heads}
    do:
      cmd: cp params.yaml ${key}.txt
      params:
        - heads.${key}
      outs:
        - ${key}.txt
  evaluate:
    cmd: cat logreg.txt mlp.txt > summary.txt
    deps: [logreg.txt, mlp.txt]
    outs: [summary.txt]
"""


def toy_project(root: Path) -> Path:
    """A finished toy DVC project (no git) in ``root``."""
    root.mkdir()
    (root / "dvc.yaml").write_text(_TOY_DVC)
    params = {"heads": {"logreg": {"C": [0.01, 0.1]}, "mlp": {"hidden": 8}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc(["init", "--no-scm", "-q"], root)
    repro(root)
    return root


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["DVC_NO_ANALYTICS"] = "1"
    done = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"`dvc {' '.join(args)}` in {cwd} failed:\n{done.stdout}{done.stderr}")
    return done


def halved(value):
    """``value`` / 2, or each value of a grid (a list) halved."""
    return [v / 2 for v in value] if isinstance(value, list) else value / 2


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project", type=Path, default=Path.cwd())
    parser.add_argument("--smoke", action="store_true", help="a toy project, in seconds")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-reruns-") as tmp:
        if args.smoke:
            args.project = toy_project(Path(tmp, "toy"))
        if not (args.project / "dvc.lock").is_file():
            sys.exit(f"{args.project}: no dvc.lock; run `make demo` there first.")
        project = Path(tmp, "project")
        shutil.copytree(
            args.project, project, symlinks=True, ignore=shutil.ignore_patterns(".venv")
        )
        settle, ran = repro(project)
        if ran:
            sys.exit(f"{args.project} is not up to date: `dvc repro` ran {ran}.")
        noop, _ = repro(project)
        print(f"dvc repro, nothing changed: {noop:.2f} s / 3 s = {noop / 3:.2f}")

        params = yaml.safe_load((project / "params.yaml").read_text())
        params["heads"]["logreg"]["C"] = halved(params["heads"]["logreg"].get("C", 1.0))
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        rerun, ran = repro(project)
        print(
            f"dvc repro after a head param change ({', '.join(ran)}): {rerun:.2f} s / 30 s = {rerun / 30:.2f}"
        )
        print(f"(first repro after the copy, rehashing every file: {settle:.2f} s)")


if __name__ == "__main__":
    main()
