"""Read speed of three feature caches (read + align + concatenate) against raw numpy files.

    .venv/bin/python bench/bench_cache_read.py [--rows 50000] [--dim 2048] [--dir /tmp/x] [--smoke]

Writes three synthetic caches of N x dim float32 with CacheWriter and the same embeddings as
.npy files, warms the page cache with one read of each, then times (median of --repeats)
load_features against np.load of the three arrays + np.concatenate(axis=1, out=X), alternating
runs. GB/s counts the bytes of X. Other figures go to stderr; stdout holds only the two result lines.
--smoke: 256 rows of 16, one timing: checks the code runs.
"""

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.models.preprocessing import Preprocessing
from pipeline.storage.feature_cache import SPLITS, CacheWriter, cache_attrs
from pipeline.storage.fused import load_features

SYNTHETIC = Preprocessing(299, "stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")

BACKBONES = ("resnet50", "inception_v3", "legacy_xception")


def write_inputs(root: Path, n: int, dim: int) -> tuple[list[Path], list[Path]]:
    ids = np.array([hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)])
    rng = np.random.default_rng(0)
    label, split = rng.integers(0, 4, n), np.asarray(SPLITS)[rng.integers(0, 3, n)]
    caches, raws = [], []
    for name in BACKBONES:
        emb = rng.standard_normal((n, dim), dtype=np.float32)
        logits = rng.standard_normal((n, 4), dtype=np.float32)
        attrs = cache_attrs(name, "abcd", SYNTHETIC, "0" * 64, "1" * 64)
        caches.append(root / f"{name}.h5")
        with CacheWriter(caches[-1], n, dim, attrs) as w:
            for s in range(0, n, 1024):
                rows = slice(s, s + 1024)
                w.write(s, emb[rows], logits[rows], ids[rows], label[rows], split[rows])
        raws.append(root / f"{name}.npy")
        np.save(raws[-1], emb)
    return caches, raws


def reference(raws: list[Path]) -> np.ndarray:
    """Raw speed: read the flat arrays and concatenate them into a preallocated X."""
    parts = [np.load(p) for p in raws]
    X = np.empty((len(parts[0]), sum(p.shape[1] for p in parts)), np.float32)
    return np.concatenate(parts, axis=1, out=X)


def median_seconds(fns, repeats: int) -> list[float]:
    """Median time of each function; runs alternate so a noisy neighbour hits both alike."""
    for fn in fns:
        fn()  # warm: both sides read from the page cache
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny caches, one timing")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.dim, args.repeats = 256, 16, 1
    root = Path(tempfile.mkdtemp(prefix="bench_cache_", dir=args.dir))
    try:
        t = time.perf_counter()
        caches, raws = write_inputs(root, args.rows, args.dim)
        print(f"wrote 3 x {caches[0].stat().st_size / 1e6:.0f} MB caches in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)  # fmt: skip
        fused = load_features(caches)
        np.testing.assert_array_equal(fused.X, reference(raws))  # same bytes, same result
        gb = fused.X.nbytes / 1e9
        del fused
        ours, raw = median_seconds([lambda: load_features(caches), lambda: reference(raws)],
                                   args.repeats)  # fmt: skip
        measured, ref = gb / ours, gb / raw
        t = time.perf_counter()
        load_features(caches).checksums  # noqa: B018
        print(f"load_features + checksums (sha256, lazy): {time.perf_counter() - t:.2f} s "
              f"for {gb:.2f} GB", file=sys.stderr)  # fmt: skip
        print(f"cache_read: {measured:.2f} GB/s / {ref:.2f} GB/s = {measured / ref:.2f}")
        print(f"cache_read_abs: {measured:.2f} GB/s / 1.0 GB/s = {measured:.2f}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
