"""HDF5 feature caches (schema 2): one file per backbone holding every sample's embedding, a
schema of the row store (`pipeline.storage.rowstore`: atomic, deterministic, digested).

Written, read and checked here; aligned by sample id and fused for fusion in
`pipeline.storage.fused`. Pure numpy + h5py: nothing in a cache is unpickled or executed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.data.splits import SPLITS  # split code i means SPLITS[i]
from pipeline.errors import CacheError
from pipeline.models.preprocessing import Preprocessing
from pipeline.storage import rowstore
from pipeline.storage.alignment import Reference, split_codes
from pipeline.storage.rowstore import (
    Column,
    Schema,
    Store,
    check_unique,
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
# What makes old embeddings valid for a new extraction (fold_checkpoint_sha256: the fold
# models of a cross-fitted checkpoint, which embedded the train rows).
IDENTITY = (
    "checkpoint_sha256", "preprocessing", "layer", "dtype", "tta", "engine",
    "fold_checkpoint_sha256",
)  # fmt: skip
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
        columns["split"] = split_codes(columns["split"], self.path)
        self._rows.write(start, columns)


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
class CacheHeader:
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
        is checked first, once per process). Refuses NaN / inf; see `read_rows`."""
        if src is not None:
            guarded(self.path, self.store.verify, "embeddings")
        digest = read_rows(self.path, self.embeddings, out, cols, src)
        if digest is not None:
            self.store.confirm("embeddings", digest)


def read_rows(path: Path, ds: h5py.Dataset, out, cols, src) -> str | None:
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
            guarded(path, ds.read_direct, piece, np.s_[s:e])
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


def guarded(path: Path, fn, *args):
    """Call an h5py function, turning its OSError into a CacheError naming the file."""
    try:
        return fn(*args)
    except OSError as e:
        raise CacheError(f"{path}: cannot read the HDF5 data ({e}); the file is corrupt") from None


def open_header(path: str | os.PathLike, unique: bool = True) -> CacheHeader:
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


def _check_header(store: Store) -> CacheHeader:
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
    return CacheHeader(store, logits, label, split, col[FOLD].astype(np.int8, copy=False))


def read_cache(path: str | os.PathLike) -> FeatureCache:
    """Read and check a whole cache: embeddings (N, D), logits (N, C), ids / labels / splits
    (N,), every dataset against its digest. Raises CacheError naming the file and the problem
    (corrupt, tampered, foreign schema, shapes, duplicate ids, NaN / inf, bad labels or
    splits)."""
    head = open_header(path)
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


# ---------------------------------------------------------------------------- reuse, checks


def reusable_cache(path: str | os.PathLike, attrs: Mapping) -> FeatureCache | None:
    """The existing cache at `path` if its rows can be reused for a new extraction whose
    `cache_attrs` are ``attrs``, else None.

    Reusable means: it reads cleanly, every digest included, and its IDENTITY attributes
    (checkpoint, preprocessing record, layer, dtype, tta, engine, fold models) equal those of
    ``attrs``. A missing file is simply not reusable; a damaged or tampered one is logged and
    not reused (its rows are computed again). Typical incremental extraction, in manifest order (samples gone from
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
        head = open_header(path)
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
                problems += Reference.of(manifest).problems(head)[0]
            except CacheError as e:
                problems.append(str(e))
        return problems


def cache_info(path: str | os.PathLike) -> dict:
    """Attributes, shape, dtype, size in bytes and rows per split of a cache (the embeddings'
    values are not read)."""
    head = open_header(path)
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
