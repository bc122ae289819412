"""HDF5 feature caches (schema 2): one file per backbone holding every sample's embedding, a
schema of the row store (`pipeline.storage.rowstore`: atomic, deterministic, digested).

Read, checked and aligned by sample id for fusion. Pure numpy + h5py: nothing in a cache is
unpickled or executed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import CacheError
from pipeline.models.preprocessing import Preprocessing
from pipeline.storage import rowstore
from pipeline.storage.hashing import file_sha256
from pipeline.storage.rowstore import (
    SPLITS,
    Column,
    Schema,
    Store,
    check_unique,
    file_identity,
    ids_to_bytes,
)

SCHEMA = 2  # 2: the preprocessing record stored whole, digests of every dataset
# File attributes after `schema`, in the order they are written; extras follow, sorted by
# name, then `digests`. No clock time among them: DVC hashes the file, and identical inputs
# must give identical bytes.
ATTRS = (
    "backbone", "dim", "n_classes", "class_names", "checkpoint_sha256", "manifest_sha256",
    "preprocessing", "layer", "dtype", "tta", "engine", "versions",
)  # fmt: skip
# What makes old embeddings valid for a new extraction.
IDENTITY = ("checkpoint_sha256", "preprocessing", "layer", "dtype", "tta", "engine")
# Cross-fitting: the fold model that embedded each row, -1 = the model trained on all of train.
FOLD = "fold"
FEATURES = Schema(
    kind="feature cache",
    marker="schema",
    version=SCHEMA,
    columns=(
        Column("embeddings", "f", 2, small=False),
        Column("logits", "f", 2),
        Column("sample_id", "S", 1),
        Column("label", "iu", 1),
        Column("split", "u", 1),
        Column(FOLD, "i", 1),
    ),
    attrs=ATTRS,
    identity=IDENTITY,
    rerun="defuse extract BACKBONE",
    defaults={"engine": "torch"},  # caches from before extract.engine: torch made them all
)
DATASETS = tuple(c.name for c in FEATURES.columns)
_PIECE_ROWS = 512  # rows read at a time: checked for NaN while still in the CPU cache
_GAP_ROWS = 64  # unwanted rows between two wanted ones that are cheaper read through than skipped
# A streamed block is held a few times over while a head trains on it (read, its float64
# statistics, standardized, cast): a 32nd of the memory budget keeps all that well inside it.
_BLOCK_SHARE = 32


def cache_attrs(
    backbone: str,
    class_names: Sequence[str],
    preprocessing: Preprocessing,
    checkpoint_sha256: str,
    manifest_sha256: str,
    *,
    layer: str = "pre_logits",
    dtype: str = "float32",
    tta: bool = False,
    engine: str = "torch",  # what ran the backbone (extract.engine)
    versions: Mapping | str | None = None,  # a mapping, or its JSON text
    **extra,
) -> dict:
    """The attributes a CacheWriter needs (but `dim` and `n_classes`, which it derives):
    the one place that lists them. ``extra`` str / number attributes are stored after them."""
    return dict(
        backbone=backbone,
        class_names=list(class_names),
        checkpoint_sha256=checkpoint_sha256,
        manifest_sha256=manifest_sha256,
        preprocessing=preprocessing,
        layer=layer,
        dtype=np.dtype(dtype).name,
        tta=tta,
        engine=engine,
        versions=versions if versions is not None else {},
        **extra,
    )


# ---------------------------------------------------------------------------- writer


class CacheWriter:
    """Stream a feature cache to `path`: all rows or nothing, identical bytes for identical
    input (a `rowstore.RowWriter`: preallocated, written in place, temporary file beside
    `path`, renamed into place only when every row was written with unique ids).

    `attrs`: what `cache_attrs` returns; the dtype of the embeddings is `attrs["dtype"]`
    (float32 or float16) and n_classes is len(attrs["class_names"]):

        with CacheWriter(path, n, 1280, attrs) as w:
            for start in range(0, n, 64):
                w.write(start, emb, logits, ids, labels, splits)  # (b, 1280), (b, C), (b,) x3
    """

    def __init__(self, path: str | os.PathLike, n_rows: int, dim: int, attrs: Mapping):
        self.path = Path(path)
        given = dict(attrs)
        missing = [k for k in ATTRS if k not in given and k not in ("dim", "n_classes")]
        if missing:
            raise CacheError(f"{self.path}: missing attributes {missing}")
        self.dtype = np.dtype(given["dtype"])
        if self.dtype not in (np.float32, np.float16):
            raise CacheError(f"{self.path}: dtype must be float32 or float16, got {self.dtype}")
        n_classes = len(given["class_names"])
        if min(n_rows, dim, n_classes) < 1:
            raise CacheError(
                f"{self.path}: n_rows, dim and n_classes must be >= 1, "
                f"got {n_rows}, {dim}, {n_classes}"
            )
        self.n_rows, self.dim, self.n_classes = int(n_rows), int(dim), n_classes
        given |= dict(dim=self.dim, n_classes=n_classes, dtype=self.dtype.name)
        shapes = dict(
            embeddings=((self.dim,), self.dtype),
            logits=((n_classes,), np.float32),
            sample_id=((), rowstore.ID_DTYPE),
            label=((), np.int64),
            split=((), np.uint8),
            fold=((), np.int8),
        )
        self._rows = rowstore.RowWriter(self.path, FEATURES, self.n_rows, shapes, given)
        self.tmp = self._rows.tmp

    def __enter__(self) -> CacheWriter:
        self._rows.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._rows.__exit__(*exc)

    def write(self, start: int, embeddings, logits, sample_id, label, split, fold=None) -> None:
        """Write rows [start, start + b): embeddings (b, dim), logits (b, n_classes), sample_id
        (b,) str, label (b,) int in [0, n_classes), split (b,) "train"/"val"/"test" or 0/1/2,
        fold (b,) int: the cross-fitting fold model of each row, -1 (the default) for the
        model trained on all of train."""
        with np.errstate(over="ignore"):  # float16 overflow is refused below, naming the sample
            emb = np.ascontiguousarray(embeddings, dtype=self.dtype)
        ids = ids_to_bytes(sample_id, self.path)
        fold = np.full(len(ids), -1, np.int8) if fold is None else np.asarray(fold, np.int8)
        columns = dict(embeddings=emb, logits=np.ascontiguousarray(logits, dtype=np.float32),
                       sample_id=ids, label=np.asarray(label), split=np.asarray(split),
                       fold=fold)  # fmt: skip
        self._rows.check(start, columns)
        for name in ("embeddings", "logits"):
            bad = _first_nonfinite(columns[name])  # after the cast: float16 overflows to inf
            if bad is not None:
                raise CacheError(
                    f"{self.path}: {name} of sample {ids[bad].decode()} are not finite"
                )
        lab = columns["label"]
        if lab.dtype.kind not in "iu" or ((lab < 0) | (lab >= self.n_classes)).any():
            raise CacheError(f"{self.path}: labels must be ints in [0, {self.n_classes})")
        columns["label"] = lab.astype(np.int64)
        columns["split"] = _split_codes(columns["split"], self.path)
        self._rows.write(start, columns)


def _split_codes(split: np.ndarray, where) -> np.ndarray:
    if split.dtype.kind in "iu":
        codes = split
    else:
        lookup = {name: code for code, name in enumerate(SPLITS)}
        try:
            codes = np.array([lookup[str(s)] for s in split.tolist()], dtype=np.int64)
        except KeyError as e:
            raise CacheError(f"{where}: split {e.args[0]!r} is not one of {SPLITS}") from None
    if ((codes < 0) | (codes >= len(SPLITS))).any():
        raise CacheError(f"{where}: split codes must be in [0, {len(SPLITS)}) for {SPLITS}")
    return codes.astype(np.uint8)


def _first_nonfinite(a: np.ndarray) -> int | None:
    """Row of the first NaN / inf in `a` (n, d), or None; one fast pass in the common case."""
    if a.dtype == np.float16:  # numpy's float16 math is slow: test the exponent bits instead
        if (a.view(np.uint16) & 0x7FFF).max(initial=0) < 0x7C00:
            return None
    else:
        with np.errstate(all="ignore"):
            if np.isfinite(a.sum(dtype=a.dtype)):  # NaN/inf propagate; overflow rechecks below
                return None
    bad = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))
    return int(bad[0]) if len(bad) else None


# ---------------------------------------------------------------------------- reader


@dataclass(frozen=True, eq=False)
class FeatureCache:
    """One cache in memory; rows in file order. `attrs` holds the decoded file attributes."""

    path: Path
    embeddings: np.ndarray  # (N, D) float32 or float16, as stored
    logits: np.ndarray  # (N, n_classes) float32
    sample_id: np.ndarray  # (N,) str
    label: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) str: "train" / "val" / "test"
    attrs: dict
    fold: np.ndarray  # (N,) int8: cross-fitting fold model of each row, -1 = the full model

    def rows_for(self, sample_ids: Sequence[str]) -> np.ndarray:
        """(M,) int64: the row of each given id in this cache, -1 where it is absent."""
        return rowstore.rows_for(ids_to_bytes(self.sample_id, self.path), sample_ids)


@dataclass
class _Header:
    """Everything in a cache but the embeddings' values, checked; the file stays open."""

    store: Store
    logits: np.ndarray  # (N, C) float32
    label: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) uint8 codes
    fold: np.ndarray  # (N,) int8, -1 where the model trained on all of train embedded the row

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def file(self) -> h5py.File:
        return self.store.file

    @property
    def attrs(self) -> dict:
        return self.store.attrs

    @property
    def sample_id(self) -> np.ndarray:  # (N,) S64
        return self.store.sample_id

    @property
    def embeddings(self) -> h5py.Dataset:
        return self.file["embeddings"]

    def read_into(self, out: np.ndarray, cols=slice(None), src: np.ndarray | None = None):
        """Copy embeddings into out[:, cols]: file row src[i] to out row i (src None: every
        row in file order, checked against the digest as they are read; otherwise the digest
        is checked first, once per process). Refuses NaN / inf; see `_read_rows`."""
        if src is not None:
            _guard(self.path, self.store.verify, "embeddings")
        digest = _read_rows(self.path, self.embeddings, out, cols, src)
        if digest is not None:
            self.store.confirm("embeddings", digest)


def _read_rows(path: Path, ds: h5py.Dataset, out, cols, src) -> str | None:
    """out[i, cols] = ds[src[i]] for every i (src None: out[:n, cols] = ds[:n], and the
    sha256 hex of all of ds's bytes is returned; else None).

    Reads whole row ranges of up to _PIECE_ROWS rows, never a fancy index (slow in HDF5):
    wanted rows less than _GAP_ROWS apart are read through, scattered ones one range each.
    Every row read is checked for NaN / inf, named by sample id and file row.
    """
    n = ds.shape[0]
    whole = hashlib.sha256() if src is None else None
    if src is None:
        order, wanted = None, np.arange(n)
    elif len(src) < 2 or (np.diff(src) > 0).all():
        order, wanted = None, np.asarray(src)  # increasing: out rows follow file rows
    else:
        order = np.argsort(src, kind="stable")
        wanted = src[order]
    direct = src is None and cols == slice(None) and out.dtype == ds.dtype
    buf = None if direct else np.empty((min(_PIECE_ROWS, n), ds.shape[1]), ds.dtype)
    cuts = np.flatnonzero(np.diff(wanted) > _GAP_ROWS) + 1
    for first, last in zip([0, *cuts.tolist()], [*cuts.tolist(), len(wanted)], strict=True):
        run = wanted[first:last]  # increasing file rows, each gap at most _GAP_ROWS
        for s in range(int(run[0]), int(run[-1]) + 1, _PIECE_ROWS) if len(run) else ():
            e = min(s + _PIECE_ROWS, int(run[-1]) + 1)
            piece = out[s:e] if direct else buf[: e - s]
            _guard(path, ds.read_direct, piece, np.s_[s:e])
            if whole is not None:
                whole.update(piece)
            bad = _first_nonfinite(piece)
            if bad is not None:
                sample = ds.file["sample_id"][s + bad].decode()
                raise CacheError(
                    f"{path}: embeddings of sample {sample} (row {s + bad}) contain NaN or inf"
                )
            if direct:
                continue
            i, j = first + np.searchsorted(run, [s, e])  # out rows i:j come from this piece
            dest = slice(i, j) if order is None else order[i:j]
            # a column block of X, float16 -> float32, another row order or a row subset
            out[dest, cols] = piece if j - i == e - s else piece[run[i - first : j - first] - s]
    return None if whole is None else whole.hexdigest()


def _guard(path: Path, fn, *args):
    """Call an h5py function, turning its OSError into a CacheError naming the file."""
    try:
        return fn(*args)
    except OSError as e:
        raise CacheError(f"{path}: cannot read the HDF5 data ({e}); the file is corrupt") from None


def _open(path: str | os.PathLike, unique: bool = True) -> _Header:
    """Open and check a cache but its embeddings' values (`rowstore.open_store`, then what
    the values must mean); `unique=False` leaves the sample id uniqueness check to a caller
    that can often skip it (load_features)."""
    store = rowstore.open_store(path, FEATURES)
    try:
        head = _check_header(store)
        if unique:
            check_unique(head.sample_id, store.path)
        return head
    except rowstore.H5_ERRORS as e:
        store.file.close()
        raise CacheError(f"{store.path}: unreadable feature cache ({e})") from None
    except BaseException:
        store.file.close()
        raise


def _check_header(store: Store) -> _Header:
    path, attrs, col, f = store.path, store.attrs, store.columns, store.file
    n, dim = f["embeddings"].shape
    n_classes = f["logits"].shape[1]
    expected = dict(dim=dim, n_classes=n_classes, dtype=f["embeddings"].dtype.name)
    for key, value in expected.items():
        if attrs[key] != value:
            raise CacheError(f"{path}: attribute {key}={attrs[key]!r} but the data say {value!r}")
    if len(attrs["class_names"]) != n_classes:
        raise CacheError(
            f"{path}: {len(attrs['class_names'])} class_names for {n_classes} logit columns"
        )
    Preprocessing.from_json(attrs["preprocessing"], where=f"{path}: attribute preprocessing")
    ids, logits, label, split = col["sample_id"], col["logits"], col["label"], col["split"]
    bad_rows = np.flatnonzero((ids.view(np.uint8).reshape(n, -1) >= 128).any(axis=1))
    if len(bad_rows):  # ids are ASCII; a flipped bit in them is damage, named here
        raise CacheError(f"{path}: sample_id of row {bad_rows[0]} is not ASCII text")
    bad = _first_nonfinite(logits)
    if bad is not None:
        raise CacheError(
            f"{path}: logits of sample {ids[bad].decode()} (row {bad}) contain NaN or inf"
        )
    for name, bad_rows, what in (
        ("label", (label < 0) | (label >= n_classes), f"outside [0, {n_classes})"),
        ("split code", split >= len(SPLITS), f"not a code of {SPLITS}"),
    ):
        rows = np.flatnonzero(bad_rows)
        if len(rows):
            r = rows[0]
            value = (label if name == "label" else split)[r]
            raise CacheError(
                f"{path}: {name} {value} of sample {ids[r].decode()} (row {r}) is {what}"
            )
    logits, label = logits.astype(np.float32, copy=False), label.astype(np.int64, copy=False)
    return _Header(store, logits, label, split, col[FOLD].astype(np.int8, copy=False))


def read_cache(path: str | os.PathLike) -> FeatureCache:
    """Read and check a whole cache: embeddings (N, D), logits (N, C), ids / labels / splits
    (N,), every dataset against its digest. Raises CacheError naming the file and the problem
    (corrupt, tampered, foreign schema, shapes, duplicate ids, NaN / inf, bad labels or
    splits)."""
    head = _open(path)
    with head.file:
        emb = np.empty(head.embeddings.shape, head.embeddings.dtype)
        head.read_into(emb)
    return FeatureCache(
        path=head.path,
        embeddings=emb,
        logits=head.logits,
        sample_id=head.sample_id.astype(str),
        label=head.label,
        split=np.asarray(SPLITS)[head.split],
        attrs=head.attrs,
        fold=head.fold,
    )


# ---------------------------------------------------------------------------- alignment


def _id_difference(ids: np.ndarray, where, ref_ids: np.ndarray, ref_where) -> str | None:
    """Counts and one example of ids found on one side only, or None if the sets are equal."""
    parts = []
    for a, a_where, b, b_where in (
        (ref_ids, ref_where, ids, where),
        (ids, where, ref_ids, ref_where),
    ):
        only = np.flatnonzero(rowstore.rows_for(b, a) < 0)
        if len(only):
            parts.append(
                f"{len(only)} of the {len(a)} ids in {a_where} are missing from {b_where} "
                f"(e.g. {a[only[0]].decode()})"
            )
    return "different samples: " + "; ".join(parts) if parts else None


def _disagreement(name, ref, ref_where, got, where, ids: np.ndarray) -> str | None:
    """First sample whose label / split code differs between two aligned arrays (N,)."""
    bad = np.flatnonzero(ref != got)
    if not len(bad):
        return None
    i = bad[0]
    show = (lambda c: SPLITS[c]) if name == "split" else int
    return (
        f"sample {ids[i].decode()} has {name} {show(ref[i])!r} in {ref_where} but "
        f"{show(got[i])!r} in {where} ({len(bad)} samples differ)"
    )


@dataclass(frozen=True)
class _Reference:
    """The row order everything is aligned to: the manifest's, or the first cache's."""

    sample_id: np.ndarray  # (N,) S64
    label: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) uint8 codes
    sha256: str
    where: str

    @classmethod
    def of(cls, manifest=None, head: _Header | None = None) -> _Reference:
        if manifest is None:
            ref = cls(head.sample_id, head.label, head.split, head.attrs["manifest_sha256"],
                      str(head.path))  # fmt: skip
        else:
            ref = cls(
                ids_to_bytes(np.asarray(manifest.sample_id), "the manifest"),
                np.asarray(manifest.label, np.int64),
                _split_codes(np.asarray(manifest.split), "the manifest"),
                str(manifest.sha256),
                "the manifest",
            )
            if not len(ref.sample_id) == len(ref.label) == len(ref.split):
                raise CacheError("the manifest's sample_id, label and split differ in length")
        check_unique(ref.sample_id, ref.where)  # caches in the same order need no check
        return ref

    def problems(self, head: _Header) -> tuple[list[str], np.ndarray | None]:
        """What keeps `head` from aligning to this reference, and its rows in reference order
        (None when they are already in it)."""
        found = []
        if head.attrs["manifest_sha256"] != self.sha256:
            found.append(
                f"{head.path} was extracted from manifest {head.attrs['manifest_sha256']} but "
                f"{self.where} is manifest {self.sha256}; re-extract it"
            )
        if np.array_equal(head.sample_id, self.sample_id):
            rows = None  # the common case: no lookup, no permutation
        else:
            check_unique(head.sample_id, head.path)
            rows = rowstore.rows_for(head.sample_id, self.sample_id)
            diff = _id_difference(head.sample_id, head.path, self.sample_id, self.where)
            if diff:
                return [*found, diff], None
        take = slice(None) if rows is None else rows
        for name, ref, got in (
            ("label", self.label, head.label),
            ("split", self.split, head.split),
        ):
            msg = _disagreement(name, ref, self.where, got[take], head.path, self.sample_id)
            if msg:
                found.append(msg)
        return found, rows


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
                _read_rows(part.path, f["embeddings"], out, cols, src)
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
    heads: list[_Header] = []
    try:
        for p in paths:
            heads.append(_open(p, unique=False))
        return _fuse(heads, backbones, manifest, max_bytes)
    finally:
        for h in heads:
            h.file.close()


def _fuse(heads: list[_Header], backbones, manifest, max_bytes) -> FusedFeatures:
    names = tuple(h.attrs["backbone"] for h in heads)
    if backbones is not None and tuple(backbones) != names:
        files = ", ".join(str(h.path) for h in heads)
        raise CacheError(f"backbones {tuple(backbones)} requested but {files} hold {names}")
    if len(set(names)) != len(names):
        raise CacheError(f"a backbone is given twice: {names}")
    first, ref = heads[0], _Reference.of(manifest, heads[0])
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
            _guard(h.path, h.store.verify, "embeddings")
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


# ---------------------------------------------------------------------------- reuse, checks


def reusable_cache(path: str | os.PathLike, attrs: Mapping) -> FeatureCache | None:
    """The existing cache at `path` if its rows can be reused for a new extraction whose
    `cache_attrs` are ``attrs``, else None.

    Reusable means: it reads cleanly, every digest included, and its IDENTITY attributes
    (checkpoint, preprocessing record, layer, dtype, tta, engine) equal those of ``attrs``. A missing
    file is simply not reusable; a damaged or tampered one is logged and not reused (its rows
    are computed again). Typical incremental extraction, in manifest order (samples gone from
    the manifest just disappear):

        old = reusable_cache(path, attrs)
        src = old.rows_for(manifest.sample_id) if old else np.full(n, -1)  # (n,) old row / -1
        with CacheWriter(path, n, dim, attrs) as w:
            ...  # rows with src >= 0 copied from old.embeddings / old.logits, the others run

    The old arrays are in memory, so writing over `path` is safe.
    """
    return rowstore.reusable(read_cache, path, FEATURES, attrs)


def verify_cache(
    path: str | os.PathLike, manifest=None, checkpoint_sha256: str | None = None
) -> list[str]:
    """Problems with a cache, [] when it is sound: whatever read_cache refuses, then (when
    given) a different checkpoint, a different manifest sha256, sample set, labels or splits."""
    try:
        head = _open(path)
    except CacheError as e:
        return [str(e)]
    with head.file:
        try:
            head.read_into(np.empty(head.embeddings.shape, head.embeddings.dtype))
        except CacheError as e:
            return [str(e)]
        problems = []
        stored = head.attrs["checkpoint_sha256"]
        if checkpoint_sha256 is not None and stored != checkpoint_sha256:
            problems.append(
                f"{head.path}: made by checkpoint {stored}, expected {checkpoint_sha256}"
            )
        if manifest is not None:
            try:
                problems += _Reference.of(manifest).problems(head)[0]
            except CacheError as e:
                problems.append(str(e))
        return problems


def cache_info(path: str | os.PathLike) -> dict:
    """Attributes, shape, dtype, size in bytes and rows per split of a cache (the embeddings'
    values are not read)."""
    head = _open(path)
    with head.file:
        emb = head.embeddings
        counts = np.bincount(head.split, minlength=len(SPLITS))
        return dict(
            path=str(head.path),
            attrs=head.attrs,
            shape=tuple(emb.shape),
            dtype=emb.dtype.name,
            bytes=head.path.stat().st_size,
            splits={name: int(c) for name, c in zip(SPLITS, counts, strict=True)},
            out_of_fold=int((head.fold >= 0).sum()),  # rows a cross-fitting fold model embedded
        )
