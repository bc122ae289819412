"""HDF5 feature caches (schema 1): one file per backbone holding every sample's embedding.

Written atomically and byte-for-byte deterministically; read, checked and aligned by sample id
for fusion. Pure numpy + h5py: nothing in a cache is unpickled or executed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import CacheError
from pipeline.storage import atomic
from pipeline.storage.hashing import file_sha256

SCHEMA = 1
SPLITS = ("train", "val", "test")  # split code i means SPLITS[i]
DATASETS = ("embeddings", "logits", "sample_id", "label", "split")
# Cross-fitting: the fold model that embedded each row, -1 = the model trained on all of
# train. Optional: a cache without it came from one model.
FOLD = "fold"
# File attributes, in the order they are written; extras follow, sorted by name. No clock
# time among them: DVC hashes the file, and identical inputs must give identical bytes.
ATTRS = (
    "schema", "backbone", "dim", "n_classes", "class_names", "checkpoint_sha256",
    "manifest_sha256", "input_size", "mean", "std", "layer", "dtype", "tta", "versions",
)  # fmt: skip
# What makes old embeddings valid for a new extraction, besides the checkpoint.
PREPROCESSING = ("input_size", "mean", "std", "layer", "dtype", "tta")
_DERIVED = ("schema", "dim", "n_classes", "dtype")  # the writer fills these itself
_JSON = ("class_names", "versions")  # stored as JSON text; everything else is native
_ID = "S64"  # sample ids are sha256 hex digests: 64 ASCII bytes
_PIECE_ROWS = 512  # rows read at a time: checked for NaN while still in the CPU cache
_GAP_ROWS = 64  # unwanted rows between two wanted ones that are cheaper read through than skipped
# A streamed block is held a few times over while a head trains on it (read, its float64
# statistics, standardized, cast): a 32nd of the memory budget keeps all that well inside it.
_BLOCK_SHARE = 32


# ---------------------------------------------------------------------------- attributes


def encode_attr(key: str, value):
    """Python value -> what h5py stores: UTF-8 text (JSON for some), a numpy scalar or
    numeric array. Text is fixed-length bytes: a variable-length string lives in HDF5's global
    heap, where one damaged byte can hang the library's reader instead of failing."""
    if key in _JSON:
        if isinstance(value, str):  # versions may come pre-encoded
            value = json.loads(value)
        return np.bytes_(json.dumps(value, sort_keys=True).encode("utf-8"))
    if key == "dtype":
        return np.bytes_(np.dtype(value).name.encode())
    if isinstance(value, str):
        return np.bytes_(value.encode("utf-8"))
    if isinstance(value, bool | np.bool_):
        return np.bool_(value)
    if isinstance(value, int | np.integer):
        return np.int64(value)
    if isinstance(value, float | np.floating):
        return np.float64(value)
    arr = np.asarray(value)
    if arr.ndim == 1 and arr.size and arr.dtype.kind in "iuf":
        return arr.astype(np.float64 if arr.dtype.kind == "f" else np.int64)
    raise CacheError(
        f"attribute {key!r} must be a str, int, float, bool or a list of numbers; got {value!r}"
    )


def decode_attr(key: str, raw):
    """What h5py returns -> plain Python (str, int, float, bool, list, dict)."""
    if isinstance(raw, bytes | np.bytes_):
        raw = raw.decode("utf-8")
    if key in _JSON:
        return json.loads(raw)
    return raw.tolist() if isinstance(raw, np.ndarray | np.generic) else raw


def _same(key: str, value, stored) -> bool:
    """Whether a caller's value equals a stored attribute, compared after the same encoding."""
    try:
        return decode_attr(key, encode_attr(key, value)) == stored
    except (CacheError, TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------- writer


class CacheWriter:
    """Stream a feature cache to `path`: all rows or nothing, identical bytes for identical input.

    Datasets are preallocated with `n_rows` rows and each batch is written in place, so memory
    does not grow with N. Everything goes to a hidden temporary file beside `path`
    (`pipeline.storage.atomic`: the leftovers of killed runs are removed first); a clean exit checks
    every row was written, fsyncs and renames it onto `path`, an exception deletes it and
    leaves any existing `path` untouched.

    `attrs` must hold every name in ATTRS except schema, dim, n_classes and dtype, which the
    writer sets (extra str / number / bool / numeric-list attributes are stored too):

        with CacheWriter(path, n, 1280, 4, attrs=attrs) as w:
            for start in range(0, n, 64):
                w.write(start, emb, logits, ids, labels, splits)  # (b, 1280), (b, 4), (b,) x3
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n_rows: int,
        dim: int,
        n_classes: int,
        dtype: str = "float32",
        attrs: Mapping | None = None,
    ):
        self.path = Path(path)
        self.tmp = atomic.temp_path(self.path)
        if np.dtype(dtype) not in (np.float32, np.float16):
            raise CacheError(f"{self.path}: dtype must be float32 or float16, got {dtype!r}")
        if min(n_rows, dim, n_classes) < 1:
            raise CacheError(
                f"{self.path}: n_rows, dim and n_classes must be >= 1, "
                f"got {n_rows}, {dim}, {n_classes}"
            )
        self.n_rows, self.dim, self.n_classes = int(n_rows), int(dim), int(n_classes)
        self.dtype = np.dtype(dtype)
        self._attrs = self._file_attrs(dict(attrs or {}))
        self._file: h5py.File | None = None
        self._written = np.zeros(self.n_rows, bool)
        self._next = 0

    def _file_attrs(self, given: dict) -> dict:
        derived = dict(schema=SCHEMA, dim=self.dim, n_classes=self.n_classes, dtype=self.dtype.name)
        for key, value in derived.items():
            if key in given and not _same(
                key, given.pop(key), decode_attr(key, encode_attr(key, value))
            ):
                raise CacheError(f"{self.path}: attribute {key!r} disagrees with {value!r}")
        missing = [k for k in ATTRS if k not in _DERIVED and k not in given]
        if missing:
            raise CacheError(f"{self.path}: missing attributes {missing}")
        given |= derived
        if len(given["class_names"]) != self.n_classes:
            raise CacheError(
                f"{self.path}: {len(given['class_names'])} class_names for "
                f"n_classes={self.n_classes}"
            )
        order = [*ATTRS, *sorted(set(given) - set(ATTRS))]
        return {k: encode_attr(k, given[k]) for k in order}

    def __enter__(self) -> CacheWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic.clean_stale(self.path)
        # track_order: attributes come back in the order written. Determinism checked on
        # HDF5 2.0 / h5py 3.16: with track_times=False no clock value reaches the file.
        f = self._file = h5py.File(self.tmp, "w", track_order=True)
        try:
            for key, value in self._attrs.items():
                f.attrs[key] = value
            n, kw = self.n_rows, dict(track_times=False)  # contiguous: fastest to read
            f.create_dataset("embeddings", (n, self.dim), self.dtype, **kw)
            f.create_dataset("logits", (n, self.n_classes), np.float32, **kw)
            f.create_dataset("sample_id", (n,), _ID, **kw)
            f.create_dataset("label", (n,), np.int64, **kw)
            f.create_dataset("split", (n,), np.uint8, **kw).attrs["split_names"] = encode_attr(
                "class_names", list(SPLITS)
            )
            f.create_dataset(FOLD, (n,), np.int8, fillvalue=-1, **kw)
        except BaseException:
            self._discard()
            raise
        return self

    def write(self, start: int, embeddings, logits, sample_id, label, split, fold=None) -> None:
        """Write rows [start, start + b): embeddings (b, dim), logits (b, n_classes), sample_id
        (b,) str, label (b,) int in [0, n_classes), split (b,) "train"/"val"/"test" or 0/1/2,
        fold (b,) int: the cross-fitting fold model of each row, -1 (the default) for the
        model trained on all of train."""
        if self._file is None:
            raise CacheError(f"{self.path}: write() outside the `with CacheWriter(...)` block")
        with np.errstate(over="ignore"):  # float16 overflow is refused below, naming the sample
            emb = np.ascontiguousarray(embeddings, dtype=self.dtype)
        b = len(emb)
        lgt = np.ascontiguousarray(logits, dtype=np.float32)
        ids, lab, spl = np.asarray(sample_id), np.asarray(label), np.asarray(split)
        shapes = dict(
            embeddings=(emb.shape, (b, self.dim)),
            logits=(lgt.shape, (b, self.n_classes)),
            sample_id=(ids.shape, (b,)),
            label=(lab.shape, (b,)),
            split=(spl.shape, (b,)),
        )
        for name, (got, want) in shapes.items():
            if got != want:
                raise CacheError(f"{self.path}: {name} has shape {got}, expected {want}")
        if not 0 <= start <= self.n_rows - b:
            raise CacheError(f"{self.path}: rows [{start}, {start + b}) outside [0, {self.n_rows})")
        ids = _ids_to_bytes(ids, self.path)
        for name, arr in (("embeddings", emb), ("logits", lgt)):
            bad = _first_nonfinite(arr)  # after the cast: float16 overflows to inf
            if bad is not None:
                raise CacheError(
                    f"{self.path}: {name} of sample {ids[bad].decode()} are not finite"
                )
        if lab.dtype.kind not in "iu" or ((lab < 0) | (lab >= self.n_classes)).any():
            raise CacheError(f"{self.path}: labels must be ints in [0, {self.n_classes})")
        codes = _split_codes(spl, self.path)
        f, rows = self._file, slice(start, start + b)
        f["embeddings"][rows] = emb
        f["logits"][rows] = lgt
        f["sample_id"][rows] = ids
        f["label"][rows] = lab.astype(np.int64)
        f["split"][rows] = codes
        if fold is not None:
            f[FOLD][rows] = np.asarray(fold, dtype=np.int8)
        self._written[rows] = True
        self._next = start + b

    def append(self, embeddings, logits, sample_id, label, split) -> None:
        """write() at the row after the previous batch."""
        self.write(self._next, embeddings, logits, sample_id, label, split)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            if not self._written.all():
                missing = np.flatnonzero(~self._written)
                raise CacheError(
                    f"{self.path}: {len(missing)} of {self.n_rows} rows never written "
                    f"(first: row {missing[0]})"
                )
            _check_unique(self._file["sample_id"][()], self.path)
            self._file.close()
            atomic.commit(self.tmp, self.path)
        except BaseException:
            self._discard()
            raise
        finally:
            self._file = None

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)


def _ids_to_bytes(ids: np.ndarray, where) -> np.ndarray:
    if ids.dtype.kind == "S" and ids.dtype.itemsize <= 64:
        return ids.astype(_ID)
    try:
        as_str = ids.astype(str)
        if (np.char.str_len(as_str) > 64).any():
            raise ValueError
        return np.char.encode(as_str, "ascii").astype(_ID)
    except (UnicodeEncodeError, ValueError):
        raise CacheError(f"{where}: sample ids must be ASCII strings of <= 64 chars") from None


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


def _check_unique(ids: np.ndarray, where) -> None:
    s = np.sort(ids)
    dup = np.flatnonzero(s[1:] == s[:-1])
    if len(dup):
        rows = np.flatnonzero(ids == s[dup[0]])
        shown = f"{rows[:5].tolist()}{' ...' if len(rows) > 5 else ''}"
        raise CacheError(f"{where}: sample_id {s[dup[0]].decode()!r} appears {len(rows)} times "
                         f"(rows {shown})")  # fmt: skip


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
        return _lookup(self.sample_id.astype(_ID), _ids_to_bytes(np.asarray(sample_ids), "ids"))


@dataclass
class _Header:
    """Everything in a cache but the embeddings' values, checked; the file stays open."""

    path: Path
    file: h5py.File
    attrs: dict
    logits: np.ndarray  # (N, C) float32
    sample_id: np.ndarray  # (N,) S64
    label: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) uint8 codes
    fold: np.ndarray  # (N,) int8, -1 where the model trained on all of train embedded the row

    @property
    def embeddings(self) -> h5py.Dataset:
        return self.file["embeddings"]

    def read_into(self, out: np.ndarray, cols=slice(None), src: np.ndarray | None = None):
        """Copy embeddings into out[:, cols]: file row src[i] to out row i (src None: every
        row in file order). Refuses NaN / inf; see `_read_rows`."""
        _read_rows(self.path, self.embeddings, out, cols, src)


def _read_rows(path: Path, ds: h5py.Dataset, out, cols, src) -> None:
    """out[i, cols] = ds[src[i]] for every i (src None: out[:n, cols] = ds[:n]).

    Reads whole row ranges of up to _PIECE_ROWS rows, never a fancy index (slow in HDF5):
    wanted rows less than _GAP_ROWS apart are read through, scattered ones one range each.
    Every row read is checked for NaN / inf, named by sample id and file row.
    """
    n = ds.shape[0]
    if src is None:
        order, wanted = None, np.arange(n)
    elif len(src) < 2 or (np.diff(src) > 0).all():
        order, wanted = None, np.asarray(src)  # increasing: out rows follow file rows
    else:
        order = np.argsort(src, kind="stable")
        wanted = src[order]
    if not len(wanted):
        return
    direct = src is None and cols == slice(None) and out.dtype == ds.dtype
    buf = None if direct else np.empty((min(_PIECE_ROWS, n), ds.shape[1]), ds.dtype)
    cuts = np.flatnonzero(np.diff(wanted) > _GAP_ROWS) + 1
    for first, last in zip([0, *cuts.tolist()], [*cuts.tolist(), len(wanted)], strict=True):
        run = wanted[first:last]  # increasing file rows, each gap at most _GAP_ROWS
        for s in range(int(run[0]), int(run[-1]) + 1, _PIECE_ROWS):
            e = min(s + _PIECE_ROWS, int(run[-1]) + 1)
            piece = out[s:e] if direct else buf[: e - s]
            _guard(path, ds.read_direct, piece, np.s_[s:e])
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


def _guard(path: Path, fn, *args):
    """Call an h5py function, turning its OSError into a CacheError naming the file."""
    try:
        return fn(*args)
    except OSError as e:
        raise CacheError(f"{path}: cannot read the HDF5 data ({e}); the file is corrupt") from None


def _open(path: str | os.PathLike, unique: bool = True) -> _Header:
    """Open and check a cache but its embeddings' values; `unique=False` leaves the sample id
    uniqueness check to a caller that can often skip it (load_features)."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path}: no such feature cache")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(
            f"{path}: not a readable HDF5 file: truncated, still being written or not HDF5 ({e})"
        ) from None
    try:
        head = _read_header(path, f)
        if unique:
            _check_unique(head.sample_id, path)
        return head
    # h5py reports damaged metadata as any of these (a killed writer's file: KeyError, "bad
    # object header version number"); an attribute that is not JSON is a ValueError
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
        f.close()
        raise CacheError(f"{path}: unreadable feature cache ({e})") from None
    except BaseException:
        f.close()
        raise


def _read_header(path: Path, f: h5py.File) -> _Header:
    if "schema" not in f.attrs:
        raise CacheError(f"{path}: missing attribute 'schema'; not a defuse feature cache")
    schema = decode_attr("schema", f.attrs["schema"])
    if schema != SCHEMA:
        raise CacheError(
            f"{path}: schema version {schema!r} is not supported (this defuse reads "
            f"schema {SCHEMA}); re-extract the features"
        )
    missing = [k for k in ATTRS if k not in f.attrs] + [d for d in DATASETS if d not in f]
    if missing:
        raise CacheError(f"{path}: missing attributes / datasets {missing}")
    attrs = {k: decode_attr(k, f.attrs[k]) for k in f.attrs}
    ds = {name: f[name] for name in DATASETS}
    # Check kinds before reading: a variable-length (object) dataset is never read.
    kinds = dict(embeddings="f", logits="f", sample_id="S", label="iu", split="u")
    ndims = dict(embeddings=2, logits=2)
    for name, kind in kinds.items():
        d = ds[name]
        if not isinstance(d, h5py.Dataset) or d.dtype.kind not in kind:
            raise CacheError(f"{path}: {name} has dtype {getattr(d, 'dtype', d)!r}")
        if d.ndim != ndims.get(name, 1):
            raise CacheError(f"{path}: {name} has shape {d.shape}")
    n, dim = ds["embeddings"].shape
    for name in DATASETS:
        if ds[name].shape[0] != n:
            raise CacheError(f"{path}: {name} has {ds[name].shape[0]} rows but embeddings has {n}")
    n_classes = ds["logits"].shape[1]
    expected = dict(dim=dim, n_classes=n_classes, dtype=ds["embeddings"].dtype.name)
    for key, value in expected.items():
        if attrs[key] != value:
            raise CacheError(f"{path}: attribute {key}={attrs[key]!r} but the data say {value!r}")
    if len(attrs["class_names"]) != n_classes:
        raise CacheError(
            f"{path}: {len(attrs['class_names'])} class_names for {n_classes} logit columns"
        )
    split_names = ds["split"].attrs.get("split_names")
    if split_names is None or decode_attr("class_names", split_names) != list(SPLITS):
        raise CacheError(f"{path}: split_names {split_names!r}, expected {list(SPLITS)}")

    # Whole-dataset reads: one contiguous read each, never a fancy index into h5py.
    logits, ids, label, split = (ds[k][()] for k in ("logits", "sample_id", "label", "split"))
    bad_rows = np.flatnonzero((ids.view(np.uint8).reshape(n, -1) >= 128).any(axis=1))
    if len(bad_rows):  # ids are ASCII; a flipped bit in them is damage, named here
        raise CacheError(f"{path}: sample_id of row {bad_rows[0]} is not ASCII text")
    bad = _first_nonfinite(logits)
    if bad is not None:
        raise CacheError(
            f"{path}: logits of sample {ids[bad].decode()} (row {bad}) contain NaN or inf"
        )
    bad_rows = np.flatnonzero((label < 0) | (label >= n_classes))
    if len(bad_rows):
        r = bad_rows[0]
        raise CacheError(
            f"{path}: label {label[r]} of sample {ids[r].decode()} (row {r}) is outside "
            f"[0, {n_classes})"
        )
    bad_rows = np.flatnonzero(split >= len(SPLITS))
    if len(bad_rows):
        r = bad_rows[0]
        raise CacheError(
            f"{path}: split code {split[r]} of sample {ids[r].decode()} (row {r}) is not a "
            f"code of {SPLITS}"
        )
    logits, label = logits.astype(np.float32, copy=False), label.astype(np.int64, copy=False)
    fold = np.full(n, -1, np.int8)
    if FOLD in f:
        if not isinstance(f[FOLD], h5py.Dataset) or f[FOLD].shape != (n,):
            raise CacheError(f"{path}: {FOLD} is not one int per row: {f[FOLD]!r}")
        fold = f[FOLD][()].astype(np.int8)
    return _Header(path, f, attrs, logits, ids, label, split, fold)


def read_cache(path: str | os.PathLike) -> FeatureCache:
    """Read and check a whole cache: embeddings (N, D), logits (N, C), ids / labels / splits
    (N,). Raises CacheError naming the file and the problem (corrupt, foreign schema, shapes,
    duplicate ids, NaN / inf, bad labels or splits)."""
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


def _lookup(ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """(M,) int64: the row in unique `ids` (N,) of each `query` id, -1 where absent."""
    if not len(ids):
        return np.full(len(query), -1, np.int64)
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], query).clip(max=len(ids) - 1)
    return np.where(ids[order][pos] == query, order[pos], -1).astype(np.int64)


def _id_difference(ids: np.ndarray, where, ref_ids: np.ndarray, ref_where) -> str | None:
    """Counts and one example of ids found on one side only, or None if the sets are equal."""
    parts = []
    for a, a_where, b, b_where in (
        (ref_ids, ref_where, ids, where),
        (ids, where, ref_ids, ref_where),
    ):
        only = np.flatnonzero(_lookup(b, a) < 0)
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
                _ids_to_bytes(np.asarray(manifest.sample_id), "the manifest"),
                np.asarray(manifest.label, np.int64),
                _split_codes(np.asarray(manifest.split), "the manifest"),
                str(manifest.sha256),
                "the manifest",
            )
            if not len(ref.sample_id) == len(ref.label) == len(ref.split):
                raise CacheError("the manifest's sample_id, label and split differ in length")
        _check_unique(ref.sample_id, ref.where)  # caches in the same order need no check
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
            _check_unique(head.sample_id, head.path)
            rows = _lookup(head.sample_id, self.sample_id)
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
        """backbone -> how its cache was made: the checkpoint's sha256 and the `extract`
        params that shape the features (dtype, tta); what `defuse predict` must repeat."""
        keys = ("checkpoint_sha256", "dtype", "tta")
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
            with _reopen(part.path, part.identity) as f:
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


def _reopen(path: Path, identity: tuple) -> h5py.File:
    """The cache at ``path`` opened again, if it is still the file load_features read."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path}: cannot be reopened to read rows ({e})") from None
    if file_identity(path, f) != identity:
        f.close()
        raise CacheError(f"{path}: changed since its features were loaded")
    return f


def file_identity(path: Path, f: h5py.File | None = None) -> tuple:
    """(size, mtime_ns, inode) of `path`, or of the file `f` actually has open."""
    st = os.stat(path) if f is None else os.fstat(f.id.get_vfd_handle())
    return st.st_size, st.st_mtime_ns, st.st_ino


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
    else:
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


def reusable_cache(
    path: str | os.PathLike, checkpoint_sha256: str, preprocessing: Mapping
) -> FeatureCache | None:
    """The existing cache at `path` if its rows can be reused for a new extraction, else None.

    Reusable means: it reads cleanly, was made by the same checkpoint and with the same
    preprocessing (every key of PREPROCESSING: input_size, mean, std, layer, dtype, tta). A
    missing or corrupt file is simply not reusable. Typical incremental extraction, writing
    the new cache in manifest order (samples gone from the manifest just disappear):

        old = reusable_cache(path, ckpt_sha, prep)
        src = old.rows_for(manifest.sample_id) if old else np.full(n, -1)  # (n,) old row / -1
        with CacheWriter(path, n, dim, n_classes, dtype=prep["dtype"], attrs=attrs) as w:
            for start in range(0, n, batch):
                idx = np.arange(start, min(start + batch, n))
                emb, lgt = np.empty((len(idx), dim)), np.empty((len(idx), n_classes))
                hit = src[idx] >= 0
                emb[hit], lgt[hit] = old.embeddings[src[idx][hit]], old.logits[src[idx][hit]]
                emb[~hit], lgt[~hit] = run_network(idx[~hit])  # only the new samples
                w.write(start, emb, lgt, ids[idx], labels[idx], splits[idx])

    The old arrays are in memory, so writing over `path` is safe.
    """
    missing = [k for k in PREPROCESSING if k not in preprocessing]
    if missing:
        raise CacheError(f"reusable_cache: preprocessing lacks {missing}")
    try:
        cache = read_cache(path)
    except CacheError:
        return None
    same = cache.attrs["checkpoint_sha256"] == checkpoint_sha256 and all(
        _same(k, preprocessing[k], cache.attrs[k]) for k in PREPROCESSING
    )
    return cache if same else None


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
