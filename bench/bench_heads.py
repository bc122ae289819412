"""Time the fusion heads and the head x subset comparison against the issue's targets.

Run: .venv/bin/python bench/bench_heads.py [--mlp-cv-epochs N]
Each line reads `<what>: <measured> s / <limit> s = <ratio>`; a ratio under 1 meets the
target. Targets (2 CPU cores): fitting logreg and mlp (default params, 50 epochs) on
2,000 x 6,144 float32 features in under 10 s each; 5-fold compare() over every registered
head and the 7 subsets of 3 backbones of 1280-d x 2,600 rows (ELPV-sized) under 120 s.
Timings on a shared machine vary with its load, printed first; the best of --repeat runs
is reported. When other processes keep the cores busy, --threads 1 is the fairer figure:
two torch threads wait on each other at every parallel op (7x slower at load 4 here).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from pipeline.compare import compare
from pipeline.heads import list_heads, make_head

N_CLASSES = 4


def features(n: int, dim: int, rng: np.random.Generator, y: np.ndarray) -> np.ndarray:
    """Learnable but not trivial: class means 0.03 apart per dimension, unit noise."""
    means = rng.normal(0, 0.03, (N_CLASSES, dim)).astype(np.float32)
    return rng.standard_normal((n, dim), dtype=np.float32) + means[y]


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(what: str, seconds: float, limit: float) -> None:
    print(f"{what}: {seconds:.2f} s / {limit:g} s = {seconds / limit:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="report the best of N runs")
    parser.add_argument(
        "--mlp-cv-epochs", type=int, default=None, help="mlp epochs inside compare (default: 50)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
        f"torch threads {torch.get_num_threads()}"
    )

    rng = np.random.default_rng(0)
    y = rng.integers(0, N_CLASSES, 2_000)
    X = features(2_000, 6_144, rng, y)
    for name in ("logreg", "mlp"):
        report(f"fit_{name}", best_of(args.repeat, lambda n=name: make_head(n).fit(X, y)), 10)

    n = 2_600
    y = rng.integers(0, N_CLASSES, n)
    split = rng.choice(["train", "val", "test"], n, p=[0.73, 0.15, 0.12])
    blocks = {f"backbone{i}": features(n, 1_280, rng, y) for i in range(3)}
    logits = {b: rng.normal(0, 1, (n, N_CLASSES)) + 2 * np.eye(N_CLASSES)[y] for b in blocks}
    heads = {name: {} for name in list_heads()}
    if args.mlp_cv_epochs:
        heads["mlp"] = {"epochs": args.mlp_cv_epochs}
    print(f"# compare heads: {heads}")
    board = None

    def run():
        nonlocal board
        board = compare(blocks, y, split, heads, folds=5, logit_blocks=logits, progress=False)

    report("compare_cv", best_of(args.repeat, run), 120)
    per_head = {}
    for row in board.rows:
        per_head[row["head"]] = per_head.get(row["head"], 0.0) + row["fit_seconds"] * 5
    print("# compare seconds per head: " + ", ".join(f"{h} {s:.1f}" for h, s in per_head.items()))
    print(
        f"# pick: {board.pick['head']} on {'+'.join(board.pick['backbones'])}, "
        f"test accuracy {board.pick['test']['accuracy']:.3f}"
    )
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
