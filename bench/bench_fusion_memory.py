"""Peak memory of fusion training that streams a cache larger than its memory budget.

    .venv/bin/python bench/bench_fusion_memory.py [--rows 200000] [--epochs 1] [--memory-gb 1]
                                                 [--threads N] [--dense] [--dir /tmp] [--smoke]

Writes three synthetic float16 caches of rows x 2048 with CacheWriter (200,000 rows: 3 x 0.8 GB
on disk, 4.9 GB as the float32 matrix) with learnable labels and a 70 / 15 / 15 split, then in
a fresh child process runs what `defuse fuse mlp` runs with `fuse.memory_gb: --memory-gb`:
load_features with that budget and fit_head with params.yaml's mlp (one candidate) but --epochs (train split,
best epoch on val, cache checksums). Its peak RSS (VmHWM) is set against the budget and the
bytes of the whole float32 matrix; --dense also measures a whole load (load_features without a
budget, nothing trained) in another child. A third child trains the same head on 256 random
in-memory rows: the floor that torch and the network cost whatever the data. The caches are
deleted at the end. Stdout holds only the result lines; details go to stderr. --smoke: 600
rows of 3 x 16 under a 100 kB budget: checks the code runs (its figures are the floor's).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import FuseParams, head_params, section
from pipeline.fusion.fit import fit_head
from pipeline.fusion.heads import make_head
from pipeline.fusion.selection import candidate_params
from pipeline.models.preprocessing import Preprocessing
from pipeline.runtime import keep_freed_memory
from pipeline.storage.feature_cache import SPLITS, CacheWriter, cache_attrs
from pipeline.storage.fused import load_features

SYNTHETIC = Preprocessing(299, "stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")

BACKBONES = ("resnet50", "inception_v3", "legacy_xception")
DIM, N_CLASSES, BATCH = 2048, 4, 8192


def write_caches(root: Path, n: int, dim: int = DIM) -> list[Path]:
    """Three float16 caches of n x dim: unit noise plus a class mean (0.05 apart per column)."""
    rng = np.random.default_rng(0)
    ids = np.array([hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)])
    label = rng.integers(0, N_CLASSES, n)
    split = np.asarray(SPLITS)[rng.choice(3, n, p=[0.7, 0.15, 0.15])]
    paths = []
    for name in BACKBONES:
        means = rng.normal(0, 0.05, (N_CLASSES, dim)).astype(np.float32)
        attrs = cache_attrs(name, "abcd", SYNTHETIC, "0" * 64, "1" * 64, dtype="float16")
        paths.append(root / f"{name}.h5")
        with CacheWriter(paths[-1], n, dim, attrs) as w:
            for s in range(0, n, BATCH):
                rows = slice(s, min(s + BATCH, n))
                emb = rng.standard_normal((len(label[rows]), dim), dtype=np.float32)
                emb += means[label[rows]]
                logits = np.eye(N_CLASSES, dtype=np.float32)[label[rows]]
                w.write(s, emb, logits, ids[rows], label[rows], split[rows])
    return paths


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _mlp_entry(args) -> dict:
    """params.yaml's mlp entry, one candidate (its grids' first values), --epochs epochs."""
    entry = {k: v[0] if isinstance(v, list) else v for k, v in head_params("mlp").items()}
    return entry | {"epochs": args.epochs}


def child(mode: str, paths: list[str], args) -> dict:
    """One measured job, in a process of its own; its figures."""
    out = {"imports_mb": peak_rss_mb()}  # python, numpy, h5py, torch, sklearn
    start = time.perf_counter()
    if mode == "floor":
        rng = np.random.default_rng(0)
        X, y = rng.standard_normal((256, args.dim * len(BACKBONES)), np.float32), np.arange(256) % 4
        fuse = section(FuseParams, "fuse")
        params = candidate_params("mlp", _mlp_entry(args), [X.shape[1]], fuse.block_norm, 0)
        make_head("mlp", **params[0]).fit(X, y)
    elif mode == "dense":
        out["X"] = str(load_features(paths).X.shape)
    else:
        features = load_features(paths, max_bytes=int(args.memory_gb * 1e9))
        fuse = section(FuseParams, "fuse")  # what `defuse fuse` runs with, one mlp candidate
        _, sidecar = fit_head(features, "mlp", _mlp_entry(args), fuse)
        out |= {"X": repr(features.X), "n_train": sidecar["n_train"]}
        out["val_accuracy"] = sidecar["val_metrics"]["accuracy"]
    return out | {"seconds": time.perf_counter() - start, "peak_mb": peak_rss_mb()}


def run_child(mode: str, paths: list[Path], args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--epochs", str(args.epochs),
           "--memory-gb", str(args.memory_gb), "--threads", str(args.threads),
           "--dim", str(args.dim)]  # fmt: skip
    result = subprocess.run([*cmd, *map(str, paths)], capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{mode} child failed:\n{result.stderr}")
    figures = json.loads(result.stdout.splitlines()[-1])
    print(f"{mode} child: {figures}", file=sys.stderr, flush=True)
    return figures


def report(what: str, measured_mb: float, reference_mb: float, note: str = "") -> None:
    print(f"{what}: {measured_mb:.0f} MB / {reference_mb:.0f} MB{note} = "
          f"{measured_mb / reference_mb:.2f}", flush=True)  # fmt: skip


def main() -> None:
    keep_freed_memory()  # the allocator policy every defuse process runs with
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=1, help="mlp epochs (fuse trains 50)")
    ap.add_argument("--memory-gb", type=float, default=1.0, help="the fuse.memory_gb budget")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dense", action="store_true", help="also measure a whole float32 load")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--dim", type=int, default=DIM, help="each cache's width")
    ap.add_argument("--smoke", action="store_true", help="tiny caches, seconds")
    ap.add_argument("--child", choices=["stream", "dense", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.dim, args.memory_gb = 600, 16, 1e-4
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.paths, args)))
        return

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    root = Path(tempfile.mkdtemp(prefix="bench_fusion_memory_", dir=args.dir))
    try:
        start = time.perf_counter()
        paths = write_caches(root, args.rows, args.dim)
        whole_mb = args.rows * args.dim * len(BACKBONES) * 4 / 1e6
        log(f"wrote {sum(p.stat().st_size for p in paths) / 1e9:.2f} GB of caches in "
            f"{time.perf_counter() - start:.0f} s; the float32 matrix is {whole_mb:.0f} MB")  # fmt: skip
        log(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
            f"{args.epochs} epoch(s), torch threads {torch.get_num_threads()}")  # fmt: skip
        peak = run_child("stream", paths, args)["peak_mb"]
        floor = run_child("floor", paths, args)["peak_mb"]
        report("fusion_stream_peak_rss", peak, args.memory_gb * 1e3)
        report("fusion_stream_peak_rss_above_floor", peak - floor, args.memory_gb * 1e3,
               f" (floor: the head on 256 rows, {floor:.0f} MB)")  # fmt: skip
        report("fusion_stream_vs_whole_load", peak, whole_mb, " (computed)")
        if args.dense:
            report("fusion_stream_vs_whole_load", peak, run_child("dense", paths, args)["peak_mb"],
                   " (measured, load only)")  # fmt: skip
        log(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
