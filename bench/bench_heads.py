"""Time the fusion heads as `defuse fuse` fits them, and `defuse compare`, against targets.

Run: .venv/bin/python bench/bench_heads.py [--project DIR] [--smoke]
Each line reads `<what>: <measured> s / <limit> s = <ratio>`; a ratio under 1 meets the
target. Targets (2 CPU cores): every head of params.yaml's `heads` (its whole grid, the
choice on val and the refit, with the `fuse` section's settings) in under 30 s on
ELPV-sized features (2,624 rows, 3 x 1,280-d, ELPV's split sizes), and `compare` over every
head and the 7 backbone subsets under 120 s. With --project, the features are that finished
demo's real caches instead of synthetic ones. Timings on a shared machine vary with its
load, printed first. --smoke: 200 rows of 3 x 8-d, mlp for 2 epochs, one process: checks
the code runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline import layout
from pipeline.config import CompareParams, FuseParams, head_params, load_params, section
from pipeline.data.manifest import read_manifest
from pipeline.fusion.compare import compare
from pipeline.fusion.fit import fit_head, fit_seed_refits, fused_features
from pipeline.models.preprocessing import Preprocessing
from pipeline.runtime import keep_freed_memory
from pipeline.storage.feature_cache import CacheWriter, cache_attrs
from pipeline.storage.fused import FusedFeatures, load_features

N_CLASSES = 4


def features(n: int, dim: int, rng: np.random.Generator, y: np.ndarray) -> np.ndarray:
    """Learnable but not trivial: class means 0.03 apart per dimension, unit noise."""
    means = rng.normal(0, 0.03, (N_CLASSES, dim)).astype(np.float32)
    return rng.standard_normal((n, dim), dtype=np.float32) + means[y]


def report(what: str, seconds: float, limit: float) -> None:
    print(f"{what}: {seconds:.2f} s / {limit:g} s = {seconds / limit:.2f}", flush=True)


def synthetic(
    folder: Path, rng: np.random.Generator, rows=(1672, 296, 656), dim: int = 1280
) -> FusedFeatures:
    """Caches in ``folder``, ELPV-sized by default: train / val / test ``rows``, three
    ``dim``-d backbones."""
    split = np.repeat(["train", "val", "test"], rows)
    y = rng.integers(0, N_CLASSES, len(split))
    ids = [f"{i:064x}" for i in range(len(y))]
    names = [f"backbone{i}" for i in range(3)]
    for name in names:
        prep = Preprocessing(224, "stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
        attrs = cache_attrs(name, [str(c) for c in range(N_CLASSES)], prep, "0" * 64, "0" * 64)
        logits = rng.normal(0, 1, (len(y), N_CLASSES)) + 2 * np.eye(N_CLASSES)[y]
        with CacheWriter(folder / f"{name}.h5", len(y), dim, attrs) as w:
            w.write(0, features(len(y), dim, rng, y), logits, ids, y, split)
    return load_features([folder / f"{n}.h5" for n in names], names)


def main() -> None:
    keep_freed_memory()  # the allocator policy every defuse process runs with
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="a finished demo: use its caches")
    parser.add_argument("--smoke", action="store_true", help="tiny features, seconds")
    args = parser.parse_args()
    params_path = (args.project or Path(".")) / "params.yaml"
    print(
        f"# load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
        f"torch threads {torch.get_num_threads()}"
    )
    if args.project:
        os.chdir(args.project)
        fused = fused_features(read_manifest(layout.MANIFEST), layout.FEATURES, "params.yaml")
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_heads-")  # removed when the script ends
        shape = {"rows": (100, 60, 40), "dim": 8} if args.smoke else {}
        fused = synthetic(Path(tmp.name), np.random.default_rng(0), **shape)
    fuse = section(FuseParams, "fuse", params_path)
    heads = {h: head_params(h, params_path) for h in load_params(params_path)["heads"]}
    cp = section(CompareParams, "compare", params_path)
    if args.smoke:
        heads["mlp"] = {**heads.get("mlp", {}), "epochs": 2, "hidden": 8}
        fuse, cp = replace(fuse, n_jobs=1), replace(cp, n_jobs=1)
    for name, params in heads.items():
        start = time.perf_counter()
        _, sidecar = fit_head(fused, name, params, fuse)
        refits = fit_seed_refits(fused, name, params, fuse)  # as `defuse fuse` does
        n = len(sidecar["selection"]["candidates"]) * (1 + len(refits.heads))
        report(
            f"fuse_{name} ({n} candidate fits, seed refits included)",
            time.perf_counter() - start,
            30,
        )

    offsets = np.cumsum([0, *fused.dims])
    blocks = {b: fused.X[:, a:z] for b, a, z in zip(fused.backbones, offsets, offsets[1:])}  # noqa: B905
    start = time.perf_counter()
    board = compare(
        blocks, fused.y, fused.split, heads, folds=cp.folds, seed=cp.seed,
        min_subset=cp.min_subset, class_names=list(fused.class_names),
        logit_blocks=dict(zip(fused.backbones, fused.logits)), progress=False,  # noqa: B905
        block_norm=fuse.block_norm, select_by=fuse.select_by, refit=fuse.refit, n_jobs=cp.n_jobs,
    )  # fmt: skip
    report(f"compare (n_jobs={cp.n_jobs})", time.perf_counter() - start, 120)
    print(f"# pick: {board.pick['head']} on {'+'.join(board.pick['backbones'])}")
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
