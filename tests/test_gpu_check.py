"""bench/gpu_check.py: its CPU smoke run measures every ratio and passes both paper presets;
without a GPU the real check refuses in one line."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
# `<what>: <measured> / <reference name> <reference> = <ratio>`, the bench scripts' format
RATIO = re.compile(
    r"^(\S+) (finetune epoch|extract) images/s \(.*\): (\S+) / [a-z ]+ (\S+) = (\S+)$"
)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True
    )


def test_smoke_prints_finite_ratios_and_passes_both_presets():
    done = _run("--smoke")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()

    ratios = {}
    for line in lines:
        if m := RATIO.match(line):
            measured, reference, ratio = (float(v) for v in m.groups()[2:])
            ratios[m[1], m[2]] = (measured, reference, ratio)
    assert set(ratios) == {
        (model, kind)
        for model in ("resnet50", "inception_v3")
        for kind in ("finetune epoch", "extract")
    }
    for measured, reference, ratio in ratios.values():
        assert all(math.isfinite(v) and v > 0 for v in (measured, reference, ratio))
        assert ratio == pytest.approx(measured / reference, rel=0.05, abs=0.01)

    published = [line for line in lines if "published" in line and "not measured here" in line]
    assert len(published) == 4  # inference and training, for each of the two models
    for stem in ("fusion_paper", "attention_paper"):
        assert any(re.fullmatch(rf"preset {stem}: pass in [\d.]+ s", line) for line in lines)
    for stage in ("prepare", "finetune", "extract", "fuse", "evaluate"):
        assert any(line.startswith(f"$ defuse {stage}") for line in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_the_gpu_check_refuses_in_one_line():
    done = _run()
    assert done.returncode != 0
    assert done.stderr.strip() == "no CUDA device: run with --smoke for the CPU check"
    assert done.stdout.strip() == ""
