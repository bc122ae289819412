"""Every bench script runs: each in its --smoke mode (tiny synthetic data, CPU, seconds) in a
subprocess, so none can rot unseen. bench/gpu_check.py's smoke run is tests/test_gpu_check.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p.name for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_")
)  # fmt: skip


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "gpu_check.py"])
def test_bench_script_runs_in_smoke_mode(script):
    # One thread: tiny tensors gain nothing from two, and on a busy machine OpenMP's
    # spin-waiting makes two several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{script} --smoke:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{script} --smoke printed nothing"
