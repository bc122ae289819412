"""The one incremental HDF5 row store keyed by sample id; the feature cache and the image cache
are schemas of it (which datasets, which attributes define what its rows mean).

Written atomically and byte-for-byte deterministically, with a sha256 digest of every dataset's
raw bytes in the `digests` attribute; read only after the file proved a regular file whose
contiguous datasets lie inside it, and each dataset's digest checked before its values count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import CacheError
from pipeline.models.preprocessing import Preprocessing
from pipeline.storage import atomic

log = logging.getLogger(__name__)

ID_DTYPE = np.dtype("S64")  # sample ids are sha256 hex digests: 64 ASCII bytes
DIGESTS = "digests"  # the attribute holding {dataset: sha256 hex of its raw bytes}, written last
_JSON = ("class_names", "versions", DIGESTS)  # attributes stored as JSON text
_PIECE_BYTES = 8 << 20  # read (and hashed) at a time
# h5py reports damaged metadata as any of these (a killed writer's file: KeyError, "bad object
# header version number"); an attribute that is not JSON is a ValueError
H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)
# (resolved path, file identity, dataset) whose digest this process has checked
_verified: set[tuple[str, tuple, str]] = set()


@dataclass(frozen=True)
class Column:
    """One dataset of a schema: one row per sample."""

    name: str
    kinds: str  # numpy dtype kinds a reader accepts ("f", "iu", "S")
    ndim: int
    small: bool = True  # read whole (and its digest checked) whenever the store is opened


@dataclass(frozen=True)
class Schema:
    kind: str  # "feature cache", "image cache": how errors name the file
    marker: str  # the attribute holding the schema version; also tells the kinds apart
    version: int
    columns: tuple[Column, ...]  # in creation order; one is "sample_id"
    attrs: tuple[str, ...]  # required attributes, in the order written after the marker
    identity: tuple[str, ...]  # attributes that must match for an old file's rows to be reused
    rerun: str  # the command that writes a file of this schema, e.g. "defuse extract BACKBONE"
    # Attributes added after files were written, with the value such a file means: a file
    # without one reads as having it, and a writer given it leaves it out, so those files
    # stay valid and new ones with that value keep the same bytes.
    defaults: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class RowsWritten:
    """What an incremental write of a store did: ``n_rows`` rows at ``path``, ``n_reused``
    copied from the previous file, ``n_new`` made anew (decoded, or run through a network)."""

    path: Path
    n_rows: int
    n_reused: int
    n_new: int


# ---------------------------------------------------------------------------- attributes


def encode_attr(key: str, value):
    """Python value -> what h5py stores: UTF-8 text (JSON for some; a Preprocessing record as
    its to_json), a numpy scalar or numeric array. Text is fixed-length bytes: a
    variable-length string lives in HDF5's global heap, where one damaged byte can hang the
    library's reader instead of failing."""
    if key in _JSON:
        if isinstance(value, str):  # versions may come pre-encoded
            value = json.loads(value)
        return np.bytes_(json.dumps(value, sort_keys=True).encode("utf-8"))
    if isinstance(value, Preprocessing):
        value = value.to_json()
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


def same_attr(key: str, value, stored) -> bool:
    """Whether a caller's value equals a decoded stored attribute, after the same encoding."""
    try:
        return decode_attr(key, encode_attr(key, value)) == stored
    except (CacheError, TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------- ids


def ids_to_bytes(ids, where) -> np.ndarray:
    """(n,) sample ids as ID_DTYPE; CacheError naming ``where`` unless ASCII of <= 64 chars."""
    ids = np.asarray(ids)
    if ids.dtype.kind == "S" and ids.dtype.itemsize <= ID_DTYPE.itemsize:
        return ids.astype(ID_DTYPE)
    try:
        as_str = ids.astype(str)
        if (np.char.str_len(as_str) > ID_DTYPE.itemsize).any():
            raise ValueError
        return np.char.encode(as_str, "ascii").astype(ID_DTYPE)
    except (UnicodeEncodeError, ValueError):
        raise CacheError(f"{where}: sample ids must be ASCII strings of <= 64 chars") from None


def rows_for(ids: np.ndarray, query) -> np.ndarray:
    """(M,) int64: the row in unique ``ids`` (N,) ID_DTYPE of each ``query`` id, -1 where
    absent. A sort and a binary search, no Python dict of N entries."""
    query = ids_to_bytes(query, "ids")
    if not len(ids):
        return np.full(len(query), -1, np.int64)
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], query).clip(max=len(ids) - 1)
    return np.where(ids[order][pos] == query, order[pos], -1).astype(np.int64)


def check_unique(ids: np.ndarray, where) -> None:
    """CacheError naming the first id of ``ids`` (N,) ID_DTYPE that appears twice, and its rows."""
    s = np.sort(ids)
    dup = np.flatnonzero(s[1:] == s[:-1])
    if len(dup):
        rows = np.flatnonzero(ids == s[dup[0]])
        shown = f"{rows[:5].tolist()}{' ...' if len(rows) > 5 else ''}"
        raise CacheError(f"{where}: sample_id {s[dup[0]].decode()!r} appears {len(rows)} times "
                         f"(rows {shown})")  # fmt: skip


# ---------------------------------------------------------------------------- writer


class RowWriter:
    """Stream a row store to ``path``: all rows or nothing, identical bytes for identical rows.

    ``shapes``: every column of ``schema`` -> (shape of one row, dtype); each dataset is
    preallocated with ``n_rows`` rows (contiguous: fastest to read) and written in place, so
    memory does not grow with N. ``attrs`` holds every attribute of ``schema.attrs``
    (extras follow them, sorted). Everything goes to a hidden temporary file beside ``path``;
    a clean exit checks every row was written and the ids are unique, stores the digests,
    fsyncs and renames onto ``path``; any failure removes the temporary file.
    """

    def __init__(self, path, schema: Schema, n_rows: int, shapes: Mapping, attrs: Mapping):
        self.path, self.schema, self.n_rows = Path(path), schema, int(n_rows)
        self.tmp = atomic.temp_path(self.path)
        missing = [k for k in schema.attrs if k not in attrs]
        if missing:
            raise CacheError(f"{self.path}: missing attributes {missing}")
        order = [*schema.attrs, *sorted(set(attrs) - {*schema.attrs, schema.marker})]
        order = [k for k in order if k not in schema.defaults or attrs[k] != schema.defaults[k]]
        self._attrs = {schema.marker: encode_attr(schema.marker, schema.version)}
        self._attrs |= {k: encode_attr(k, attrs[k]) for k in order}
        self._shapes = {c.name: (tuple(shapes[c.name][0]), np.dtype(shapes[c.name][1]))
                        for c in schema.columns}  # fmt: skip
        self._file: h5py.File | None = None
        self._written = np.zeros(self.n_rows, bool)

    def __enter__(self) -> RowWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic.clean_stale(self.path)
        try:
            # track_order: attributes come back in the order written; track_times=False: no
            # clock value reaches the file (DVC hashes it)
            f = self._file = h5py.File(self.tmp, "w", track_order=True)
            for key, value in self._attrs.items():
                f.attrs[key] = value
            for name, (tail, dtype) in self._shapes.items():
                f.create_dataset(name, (self.n_rows, *tail), dtype, track_times=False)
        except BaseException:
            self._discard()
            raise
        return self

    def write(self, start: int, columns: Mapping[str, np.ndarray]) -> None:
        """Rows [start, start + b) of every column: ``columns[name]`` (b, *row shape)."""
        self.check(start, columns)
        rows = slice(start, start + len(columns["sample_id"]))
        for name in self._shapes:
            self._file[name][rows] = columns[name]
        self._written[rows] = True

    def check(self, start: int, columns: Mapping[str, np.ndarray]) -> None:
        """CacheError unless `write` can take these rows: inside the block, shapes right."""
        if self._file is None:
            raise CacheError(f"{self.path}: write() outside the `with` block")
        b = len(columns["sample_id"])
        for name, (tail, _) in self._shapes.items():
            got = np.shape(columns[name])
            if got != (b, *tail):
                raise CacheError(f"{self.path}: {name} has shape {got}, expected {(b, *tail)}")
        if not 0 <= start <= self.n_rows - b:
            raise CacheError(f"{self.path}: rows [{start}, {start + b}) outside [0, {self.n_rows})")

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
            f = self._file
            check_unique(f["sample_id"][()], self.path)
            f.attrs[DIGESTS] = encode_attr(DIGESTS, digests(f, self._shapes))
            self._file = None
            f.close()
            atomic.commit(self.tmp, self.path)
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        """Close and delete the temporary file after a failure, which is what the caller
        raises: closing may fail too (a full disk fails the final flush), the file still goes."""
        f, self._file = self._file, None
        try:
            if f is not None:
                f.close()
        except H5_ERRORS:
            log.debug("%s: closing a discarded file failed too", self.tmp, exc_info=True)
        finally:
            self.tmp.unlink(missing_ok=True)


def digests(f: h5py.File, names) -> dict[str, str]:
    """{name: sha256 hex of the dataset's raw bytes in row order} for ``names`` in ``f``."""
    return {name: _digest(f[name]) for name in names}


def _digest(ds: h5py.Dataset, h=None) -> str:
    h = h or hashlib.sha256()
    for piece in _pieces(ds):
        h.update(piece)
    return h.hexdigest()


def _pieces(ds: h5py.Dataset):
    """The rows of ``ds`` in order, as arrays of about _PIECE_BYTES read by row ranges."""
    n = ds.shape[0]
    step = max(1, _PIECE_BYTES // max(1, ds.dtype.itemsize * prod(ds.shape[1:])))
    buf = np.empty((min(step, n), *ds.shape[1:]), ds.dtype)
    for s in range(0, n, step):
        e = min(s + step, n)
        ds.read_direct(buf, np.s_[s:e], np.s_[: e - s])
        yield buf[: e - s]


# ---------------------------------------------------------------------------- reader


def file_identity(path: Path, f: h5py.File | None = None) -> tuple:
    """(size, mtime_ns, inode) of ``path``, or of the file ``f`` actually has open."""
    st = os.stat(path) if f is None else os.fstat(f.id.get_vfd_handle())
    return st.st_size, st.st_mtime_ns, st.st_ino


def check_regular(path: Path, kind: str) -> None:
    """CacheError unless ``path`` (links followed) is a regular file: a FIFO would block the
    reader, a device (/dev/zero) would feed it endless bytes."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CacheError(f"{path}: no such {kind}") from None
    except OSError as e:
        raise CacheError(f"{path}: cannot be read ({e})") from None
    if not stat.S_ISREG(mode):
        raise CacheError(f"{path}: not a regular file (a FIFO, device or folder); refused")


@dataclass(eq=False)
class Store:
    """An open row store whose header, layout and small columns are checked: ``columns`` holds
    the small datasets read whole (digests verified); big ones stay in ``file``."""

    path: Path
    schema: Schema
    file: h5py.File
    attrs: dict
    columns: dict[str, np.ndarray]
    identity: tuple  # (size, mtime_ns, inode) of the open file

    @property
    def sample_id(self) -> np.ndarray:  # (N,) ID_DTYPE
        return self.columns["sample_id"]

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def confirm(self, name: str, digest: str) -> None:
        """CacheError unless ``digest`` (of all of dataset ``name``'s bytes) is the stored one;
        remembered for this process so partial readers skip the recomputation."""
        if digest != self.attrs[DIGESTS].get(name):
            raise CacheError(
                f"{self.path}: dataset {name!r} does not match its stored sha256 digest: its "
                "values were changed after it was written; re-run "
                f"`{_rerun(self.schema, self.attrs.get('backbone'))}`"
            )
        _verified.add((str(self.path.resolve()), self.identity, name))

    def verify(self, name: str, again: bool = False) -> None:
        """Check dataset ``name`` against its digest, read by row ranges, once per process
        and file (``again``: recompute anyway)."""
        if again or (str(self.path.resolve()), self.identity, name) not in _verified:
            try:
                self.confirm(name, _digest(self.file[name]))
            except OSError as e:
                raise CacheError(f"{self.path}: cannot read dataset {name!r} ({e})") from None


def _rerun(schema: Schema, backbone) -> str:
    return schema.rerun.replace("BACKBONE", backbone if isinstance(backbone, str) else "BACKBONE")


def open_store(path, schema: Schema) -> Store:
    """Open ``path`` as a ``schema`` store and check it: a regular HDF5 file of this schema
    version, every attribute and column present with the right kind, ndim and row count,
    each column contiguous inside the file (nothing allocated from a declared shape alone),
    and the small columns read whole and matching their digests. CacheError naming the
    file otherwise; the caller closes the returned store."""
    path = Path(path)
    check_regular(path, schema.kind)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(
            f"{path}: not a readable HDF5 file: truncated, still being written or not HDF5 ({e})"
        ) from None
    try:
        attrs = _header(path, f, schema)
        size = os.fstat(f.id.get_vfd_handle()).st_size
        n = _check_layout(path, f, schema, size)
        columns = {}
        for c in schema.columns:
            if c.small:
                columns[c.name] = f[c.name][()] if n else np.empty(f[c.name].shape, f[c.name].dtype)
        store = Store(path, schema, f, attrs, columns, file_identity(path, f))
        for c in schema.columns:
            if c.small:
                h = hashlib.sha256(np.ascontiguousarray(columns[c.name]).data)
                store.confirm(c.name, h.hexdigest())
        return store
    except H5_ERRORS as e:
        f.close()
        raise CacheError(f"{path}: unreadable {schema.kind} ({e})") from None
    except BaseException:
        f.close()
        raise


def _header(path: Path, f: h5py.File, schema: Schema) -> dict:
    version = (
        decode_attr(schema.marker, f.attrs[schema.marker]) if schema.marker in f.attrs else None
    )
    if version != schema.version:
        backbone = decode_attr("backbone", f.attrs.get("backbone", b"BACKBONE"))
        raise CacheError(
            f"{path}: {schema.marker} {version!r} is not {schema.version}; not a defuse "
            f"{schema.kind} of this version: re-run `{_rerun(schema, backbone)}`"
        )
    missing = [k for k in (*schema.attrs, DIGESTS) if k not in f.attrs and k not in schema.defaults]
    missing += [c.name for c in schema.columns if c.name not in f]
    if missing:
        raise CacheError(f"{path}: missing attributes / datasets {missing}")
    attrs = {**schema.defaults, **{k: decode_attr(k, f.attrs[k]) for k in f.attrs}}
    stored = attrs[DIGESTS]
    if not isinstance(stored, dict) or not all(isinstance(v, str) for v in stored.values()):
        raise CacheError(f"{path}: attribute {DIGESTS!r} is not a JSON object of hex digests")
    return attrs


def _check_layout(path: Path, f: h5py.File, schema: Schema, size: int) -> int:
    """Rows of ``f`` after checking each column's kind, ndim, rows and storage (before any
    value is read)."""
    n = None
    for c in schema.columns:
        ds = f[c.name]
        if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in c.kinds:
            raise CacheError(f"{path}: {c.name} has dtype {getattr(ds, 'dtype', ds)!r}")
        if c.name == "sample_id" and ds.dtype != ID_DTYPE:
            raise CacheError(f"{path}: sample_id has dtype {ds.dtype}, expected {ID_DTYPE}")
        if ds.ndim != c.ndim:
            raise CacheError(f"{path}: {c.name} has shape {ds.shape}")
        n = ds.shape[0] if n is None else n
        if ds.shape[0] != n:
            first = schema.columns[0].name
            raise CacheError(f"{path}: {c.name} has {ds.shape[0]} rows but {first} has {n}")
        _check_storage(path, c.name, ds, size)
    return n


def _check_storage(path: Path, name: str, ds: h5py.Dataset, size: int) -> None:
    """Refuse data kept outside the file and shapes the file cannot hold: a 6 KB file may
    declare 10^12 rows, and a reader must not allocate them."""
    plist = ds.id.get_create_plist()
    if ds.is_virtual or plist.get_external_count():
        raise CacheError(
            f"{path}: dataset {name!r} keeps its values in other files (external or virtual "
            "storage); refused"
        )
    if plist.get_layout() != h5py.h5d.CONTIGUOUS:
        raise CacheError(
            f"{path}: dataset {name!r} is chunked or compact; defuse writes contiguous datasets"
        )
    nbytes = prod(ds.shape) * ds.dtype.itemsize  # Python ints: no overflow
    offset = ds.id.get_offset()
    stored = ds.id.get_storage_size()
    if nbytes and (offset is None or stored != nbytes or offset + nbytes > size):
        raise CacheError(
            f"{path}: dataset {name!r} declares shape {ds.shape} ({nbytes} bytes) but the "
            f"file stores {stored} bytes of it ({size} bytes in all); truncated or forged"
        )


def reopen(path: Path, identity: tuple) -> h5py.File:
    """The store at ``path`` opened again (another process, a later read), if it is still the
    file whose header was checked."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path}: cannot be reopened to read rows ({e})") from None
    if file_identity(path, f) != identity:
        f.close()
        raise CacheError(
            f"{path}: changed since it was read (another run rewrote it meanwhile?); run again"
        )
    return f


# ---------------------------------------------------------------------------- reuse


def reusable(read, path, schema: Schema, attrs: Mapping):
    """``read(path)`` when the file there can lend its rows to a new one with ``attrs``:
    readable, sound and equal in every ``schema.identity`` attribute; else None. A missing file is silently none;
    a damaged or tampered one is logged, and its rows are computed again."""
    if not Path(path).exists():
        return None
    try:
        old = read(path)
    except CacheError as e:
        log.warning("%s; its rows are not reused, all are computed again", e)
        return None
    return old if all(_agree(k, attrs, old.attrs) for k in schema.identity) else None


def _agree(key: str, new: Mapping, old: Mapping) -> bool:
    """Whether an identity attribute is the same in both: equal, or absent from both (an
    optional one, e.g. the fold models of a cross-fitted checkpoint)."""
    if key not in new or key not in old:
        return (key in new) == (key in old)
    return same_attr(key, new[key], old[key])
