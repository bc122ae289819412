"""Feature caches fused for the heads: rows aligned by sample id, embeddings concatenated
into X (in memory, or `LazyRows` read block by block under a memory budget)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.splits import SPLITS  # split code i means SPLITS[i]
from pipeline.errors import CacheError
from pipeline.storage import rowstore
from pipeline.storage.alignment import Reference
from pipeline.storage.feature_cache import CacheHeader, guarded, open_header, read_rows
from pipeline.storage.hashing import file_sha256
from pipeline.storage.rowstore import file_identity

# A streamed block is held a few times over while a head trains on it (read, its float64
# statistics, standardized, cast): a 32nd of the memory budget keeps all that well inside it.
_BLOCK_SHARE = 32


@dataclass(frozen=True, eq=False)
class FusedFeatures:
    """Several caches aligned by sample id; X's columns are the backbones' blocks in order."""

    X: np.ndarray | LazyRows  # (N, sum(dims)) float32; LazyRows when over max_bytes
    logits: list[np.ndarray]  # per backbone, (N, n_classes) float32
    y: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) str
    sample_id: np.ndarray  # (N,) str
    backbones: tuple[str, ...]
    dims: tuple[int, ...]
    class_names: tuple[str, ...]
    paths: tuple[Path, ...]
    attrs: tuple[dict, ...]  # each cache's file attributes
    _identity: tuple = field(repr=False)  # (size, mtime_ns, inode) of each file when read
    max_bytes: int | None = None  # the memory budget X was loaded under; None: unlimited
    # (N,) bool: every backbone embedded the row with a cross-fitting fold model that never
    # trained on it (train rows of cross-fitted caches); None reads as all False
    out_of_fold: np.ndarray | None = None
    _sums: dict = field(default_factory=dict, repr=False)

    @property
    def extraction(self) -> dict[str, dict]:
        """backbone -> how its cache was made: the checkpoint's sha256, its preprocessing
        record (JSON text) and the `extract` params that shape the features (dtype, tta,
        engine); what `defuse predict` must repeat."""
        keys = ("checkpoint_sha256", "preprocessing", "dtype", "tta", "engine")
        return {b: {k: a[k] for k in keys} for b, a in zip(self.backbones, self.attrs, strict=True)}

    @property
    def checksums(self) -> dict[str, str]:
        """backbone -> sha256 of its cache file. Hashed on first use, since sha256 (~2 GB/s)
        costs more than the read itself; refused if a file was replaced since it was read."""
        for name, path, ident in zip(self.backbones, self.paths, self._identity, strict=True):
            if name not in self._sums:
                if file_identity(path) != ident:
                    raise CacheError(f"{path}: changed since its features were loaded")
                self._sums[name] = file_sha256(path)
        return dict(self._sums)


@dataclass(frozen=True)
class _Part:
    """One cache as LazyRows reads it: reopened for every read, refused if replaced since."""

    path: Path
    identity: tuple  # (size, mtime_ns, inode) when load_features opened it
    src: np.ndarray | None  # (N,) file row of each reference row; None: the same order


class LazyRows:
    """Fused embeddings (n_rows, sum(dims)) float32 left in the caches until asked for.

    What load_features returns as X when the dense matrix would exceed its memory budget.
    ``view[a:b]`` and ``view[rows]`` (increasing row indices) read just those rows of every
    cache, by row ranges and refusing NaN / inf as load_features does, and return them
    concatenated as an array; ``view.take(rows)`` is a lazy view of a row subset;
    ``view.block_slices()`` cuts the rows into blocks of ``block_rows``, the unit a streaming
    head reads. Never read whole behind the caller's back: ``np.asarray(view)`` raises.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, parts: Sequence[_Part], dims: Sequence[int], rows, block_rows: int):
        self._parts, self.dims = tuple(parts), tuple(int(d) for d in dims)
        self._rows = np.asarray(rows, np.int64)  # (n,) increasing reference rows
        self.block_rows = int(block_rows)
        self.shape = (len(self._rows), sum(self.dims))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        paths = [str(p.path) for p in self._parts]
        return f"LazyRows(shape={self.shape}, block_rows={self.block_rows}, caches={paths})"

    def __array__(self, *args, **kwargs):
        raise TypeError(
            f"{self!r} is not read whole implicitly ({self.nbytes} bytes as float32); "
            "read rows with view[a:b] or view[rows]"
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the dense float32 matrix: what reading every row at once would take."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def block_slices(self) -> list[slice]:
        """Consecutive row slices of at most ``block_rows`` rows covering the view."""
        n, size = len(self), self.block_rows
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]

    def take(self, rows) -> LazyRows:
        """A lazy view of ``rows`` (a slice or increasing indices) of this one."""
        return LazyRows(self._parts, self.dims, self._rows[self._positions(rows)], self.block_rows)

    def __getitem__(self, key) -> np.ndarray:
        """(k, n_features) float32: the rows ``key`` (a slice or increasing indices) selects."""
        rows = self._rows[self._positions(key)]
        out = np.empty((len(rows), self.shape[1]), np.float32)
        offset = 0
        for part, d in zip(self._parts, self.dims, strict=True):
            src = rows if part.src is None else part.src[rows]
            with rowstore.reopen(part.path, part.identity) as f:
                cols = slice(offset, offset + d)
                read_rows(part.path, f["embeddings"], out, cols, src)
            offset += d
        return out

    def _positions(self, key) -> slice | np.ndarray:
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise IndexError(f"LazyRows reads row ranges in order; got step {key.step}")
            return key
        idx = np.asarray(key)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise IndexError(
                "LazyRows selects rows only: view[a:b] or view[rows] with a 1-D array of "
                f"increasing ints; got {key!r:.80}"
            )
        idx = idx.astype(np.int64)
        if idx.size and (idx[0] < 0 or idx[-1] >= len(self) or (np.diff(idx) <= 0).any()):
            raise IndexError(
                f"LazyRows row indices must increase and lie in [0, {len(self)}); got "
                f"{idx[:5].tolist()}{'...' if idx.size > 5 else ''}"
            )
        return idx


def load_features(
    paths: Sequence[str | os.PathLike],
    backbones: Sequence[str] | None = None,
    manifest=None,
    max_bytes: int | None = None,
) -> FusedFeatures:
    """Read caches, align their rows by sample id and concatenate embeddings into X (N, sum D).

    Rows follow the first cache's order, or `manifest`'s when given (any object with
    `sample_id`, `label`, `split` sequences of length N and a `sha256` str). Refuses, naming
    the files: caches of different manifests or sample sets, a sample whose label or split
    differs, different class names, and anything read_cache refuses. X is preallocated and
    each cache is read by row ranges into its column block; the id permutation is skipped
    when a cache is already in the reference order (the usual case).

    When X would take more than `max_bytes` (float32; None: no limit), X is a LazyRows
    instead: only ids, labels, splits and logits are read now, embeddings block by block
    when asked for (blocks of about max_bytes / 32), NaN / inf refused as they are read.
    """
    if not paths:
        raise CacheError("load_features needs at least one cache path")
    heads: list[CacheHeader] = []
    try:
        for p in paths:
            heads.append(open_header(p, unique=False))
        return _fuse(heads, backbones, manifest, max_bytes)
    finally:
        for h in heads:
            h.file.close()


def _fuse(heads: list[CacheHeader], backbones, manifest, max_bytes) -> FusedFeatures:
    names = tuple(h.attrs["backbone"] for h in heads)
    if backbones is not None and tuple(backbones) != names:
        files = ", ".join(str(h.path) for h in heads)
        raise CacheError(f"backbones {tuple(backbones)} requested but {files} hold {names}")
    if len(set(names)) != len(names):
        raise CacheError(f"a backbone is given twice: {names}")
    first, ref = heads[0], Reference.of(manifest, heads[0])
    all_rows = []
    for h in heads:
        if h.attrs["class_names"] != first.attrs["class_names"]:
            raise CacheError(
                f"class_names differ: {first.attrs['class_names']} in {first.path} but "
                f"{h.attrs['class_names']} in {h.path}"
            )
        problems, rows = ref.problems(h)
        if problems:
            raise CacheError(problems[0])
        all_rows.append(rows)

    n, dims = len(ref.sample_id), tuple(h.embeddings.shape[1] for h in heads)
    identities = tuple(file_identity(h.path, h.file) for h in heads)
    row_bytes = sum(dims) * np.dtype(np.float32).itemsize
    if max_bytes is None or n * row_bytes <= max_bytes:
        X = np.empty((n, sum(dims)), np.float32)
        offset = 0
        for h, rows, d in zip(heads, all_rows, dims, strict=True):
            h.read_into(X, slice(offset, offset + d), rows)  # rows: file row of each X row
            offset += d
    else:  # rows read later, a few at a time: the digest is checked now, on the whole file
        for h in heads:
            guarded(h.path, h.store.verify, "embeddings")
        parts = [
            _Part(h.path, ident, rows)
            for h, ident, rows in zip(heads, identities, all_rows, strict=True)
        ]
        X = LazyRows(parts, dims, np.arange(n), max(1, max_bytes // (_BLOCK_SHARE * row_bytes)))
    return FusedFeatures(
        X=X,
        logits=[
            h.logits if r is None else h.logits[r] for h, r in zip(heads, all_rows, strict=True)
        ],
        y=ref.label.copy(),
        split=np.asarray(SPLITS)[ref.split],
        sample_id=ref.sample_id.astype(str),
        backbones=names,
        dims=dims,
        class_names=tuple(first.attrs["class_names"]),
        paths=tuple(h.path for h in heads),
        attrs=tuple(h.attrs for h in heads),
        _identity=identities,
        max_bytes=max_bytes,
        out_of_fold=np.all(
            [
                (h.fold if r is None else h.fold[r]) >= 0
                for h, r in zip(heads, all_rows, strict=True)
            ],
            axis=0,
        ),
    )
