"""DVC reruns on a finished project: a no-op `dvc repro`, and a head-parameter change.

Run: .venv/bin/python bench/bench_reruns.py [--project .]
The project must have run the DAG to the end (`make demo`). It is copied to a temp folder
(its .venv left out) so nothing of yours changes; one `dvc repro` settles DVC's file-state
database after the copy, then: a no-op `dvc repro` (target < 3 s) and `dvc repro` after
halving `heads.logreg.C` (target < 30 s; only fuse@logreg and evaluate may run). Prints
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
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    done = subprocess.run(
        ["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, check=True
    )
    return time.perf_counter() - start, re.findall(r"Running stage '([^']+)'", done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project", type=Path, default=Path.cwd())
    args = parser.parse_args()
    if not (args.project / "dvc.lock").is_file():
        sys.exit(f"{args.project}: no dvc.lock; run `make demo` there first.")
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-reruns-") as tmp:
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
        params["heads"]["logreg"]["C"] = params["heads"]["logreg"].get("C", 1.0) / 2
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        rerun, ran = repro(project)
        print(
            f"dvc repro after a head param change ({', '.join(ran)}): {rerun:.2f} s / 30 s = {rerun / 30:.2f}"
        )
        print(f"(first repro after the copy, rehashing every file: {settle:.2f} s)")


if __name__ == "__main__":
    main()
