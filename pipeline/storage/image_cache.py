"""Image caches (`cache/images/<backbone>.h5`): every manifest image decoded once and brought
to its backbone's square input, uint8, keyed by sample id. finetune, extract and predict read
these rows instead of decoding the files again (a 2560x1920 JPEG costs ~11 ms of a core even
at 1/8 DCT scale); a row is exactly what the loaders make of the file, so nothing changes
downstream. Written atomically, byte-for-byte deterministic, rebuilt only for new images.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.manifest import Manifest, decoded_channels, load_image
from pipeline.errors import CacheError
from pipeline.models.registry import BackboneInfo
from pipeline.storage.atomic import atomic_file
from pipeline.storage.feature_cache import decode_attr, encode_attr, file_identity

SCHEMA = 1  # the `image_schema` attribute, which also tells an image cache from a feature cache
# What fixes a row's pixels besides the file: the square it is brought to (mean is
# letterbox's padding colour), and the libraries that decode and resample.
TARGET = ("input_size", "resize", "interpolation", "mean")
LIBRARIES = ("pillow", "torchvision")
_ID = "S64"  # sample ids are sha256 hex digests
_BLOCK_ROWS = 16  # per decoding process: rows assembled in memory and written at a time


@dataclass(frozen=True)
class DecodeResult:
    path: Path
    n_rows: int
    n_reused: int  # rows copied from the previous file
    n_decoded: int  # images decoded from their files


def target(info: BackboneInfo) -> dict:
    """The attributes a cache must hold to serve ``info``, in TARGET order."""
    p = info.preprocessing
    return {
        "input_size": p.input_size,
        "resize": p.resize,
        "interpolation": p.interpolation,
        "mean": [float(m) for m in p.mean],
    }


def _versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def _square(path: Path, sample_id: str, info: BackboneInfo) -> np.ndarray:
    """(S, S, C) uint8: the file decoded as the loaders decode it and brought to the square;
    C = 1 for a grey image. A file that no longer hashes to its sample id is refused."""
    p = info.preprocessing
    image = load_image(path, size=p.input_size, keep_gray=True, sha256=sample_id)
    pixels = np.asarray(p.square(image))
    return pixels[..., None] if pixels.ndim == 2 else pixels


def decode_images(
    manifest: Manifest,
    info: BackboneInfo,
    out: Path,
    workers: int | None = None,
    progress: bool = True,
) -> DecodeResult:
    """Write the image cache ``out``: one row per manifest image, in manifest order.

    Datasets `pixels` (N, S, S, C) uint8 (C = 3 when any image is in colour, else 1; a grey
    row fills channel 0), `channels` (N,) uint8 (1 or 3: the image's own), `sample_id` (N,);
    attributes `image_schema`, `backbone`, TARGET and `versions` (LIBRARIES). Rows of
    samples in the previous ``out`` made for the same target with the same libraries are
    copied; only the others are decoded, by ``workers`` processes (None: every core this
    process may use).
    """
    out = Path(out)
    n, size = len(manifest), info.preprocessing.input_size
    wanted = target(info) | {"versions": _versions()}
    old = _previous(out, wanted)
    old_row = old.rows_for(manifest.sample_id) if old else np.full(n, -1, np.int64)
    new = np.flatnonzero(old_row < 0)
    channels = np.zeros(n, np.uint8)
    if old:
        channels[old_row >= 0] = old.channels[old_row[old_row >= 0]]
    channels[new] = [decoded_channels(manifest.image_path(int(r))) for r in new]
    depth = int(channels.max())
    attrs = {"image_schema": SCHEMA, "backbone": info.name, **wanted}
    workers = workers or len(os.sched_getaffinity(0))
    parallel = workers > 1 and len(new) > 1
    block = _BLOCK_ROWS * workers
    reused = old.squares_at(old_row) if old else None
    bar = tqdm(total=len(new), desc=f"decode {info.name}", unit="img", disable=not progress)
    with (
        ProcessPoolExecutor(workers) if parallel else contextlib.nullcontext() as pool,
        atomic_file(out) as tmp,
        h5py.File(tmp, "w", track_order=True) as f,
        bar,
    ):
        run = pool.map if parallel else map
        for key, value in attrs.items():
            f.attrs[key] = encode_attr(key, value)
        # track_times=False: no clock value in what DVC hashes; contiguous: a row is one read
        f.create_dataset("sample_id", data=np.array(manifest.sample_id, _ID), track_times=False)
        f.create_dataset("channels", data=channels, track_times=False)
        pixels = f.create_dataset("pixels", (n, size, size, depth), np.uint8, track_times=False)
        for start in range(0, n, block):
            rows = np.arange(start, min(start + block, n))
            chunk = np.zeros((len(rows), size, size, depth), np.uint8)
            for r in rows[old_row[rows] >= 0]:
                chunk[r - start, ..., : channels[r]] = reused.array(r)
            todo = rows[old_row[rows] < 0]
            paths = [manifest.image_path(int(r)) for r in todo]
            ids = [manifest.sample_id[r] for r in todo]
            for r, square in zip(todo, run(_square, paths, ids, [info] * len(todo)), strict=True):
                if square.shape != (size, size, channels[r]):  # the header said otherwise
                    raise CacheError(
                        f"{manifest.image_path(int(r))}: decoded to shape {square.shape}, not "
                        f"the {(size, size, int(channels[r]))} its header announced"
                    )
                chunk[r - start, ..., : channels[r]] = square
                bar.update()
            pixels[start : start + len(rows)] = chunk
    return DecodeResult(out, n, n - len(new), len(new))


def _previous(out: Path, wanted: dict) -> ImageCache | None:
    """The file at ``out`` if its rows can be reused: readable, made for the same target by
    the same libraries."""
    try:
        old = read_image_cache(out)
    except CacheError:
        return None
    return old if all(old.attrs.get(k) == v for k, v in wanted.items()) else None


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True, eq=False)
class ImageCache:
    """An image cache's header and ids, checked; the pixels stay in the file (`Squares`)."""

    path: Path
    attrs: dict
    sample_id: np.ndarray  # (N,) S64
    channels: np.ndarray  # (N,) uint8: 1 or 3
    shape: tuple  # of the pixels, (N, S, S, C)
    identity: tuple  # (size, mtime_ns, inode) of the file that was read

    def rows_for(self, sample_ids: Sequence[str]) -> np.ndarray:
        """(M,) int64: the row of each sample id, -1 where this cache has none."""
        index = {sid: i for i, sid in enumerate(self.sample_id.tolist())}
        return np.array([index.get(s.encode(), -1) for s in sample_ids], np.int64)

    def squares(self, sample_ids: Sequence[str]) -> Squares:
        """The rows of ``sample_ids``, in order; those it lacks are decoded by the loaders."""
        return self.squares_at(self.rows_for(sample_ids))

    def squares_at(self, rows: np.ndarray) -> Squares:
        """`Squares` of file ``rows`` (n,), -1 for an image the cache lacks."""
        channels = np.where(rows >= 0, self.channels[rows.clip(0)], 0)
        return Squares(self.path, rows, channels, self.identity)

    def manifest_squares(self, manifest: Manifest, rows: np.ndarray) -> Squares:
        """The rows of manifest ``rows``, every one of them held (else CacheError naming the
        first missing sample)."""
        squares = self.squares([manifest.sample_id[r] for r in rows])
        missing = np.flatnonzero(squares.rows < 0)
        if len(missing):
            first = int(rows[missing[0]])
            raise CacheError(
                f"{self.path} has no row for {len(missing)} of the {len(rows)} images asked "
                f"for, e.g. sample {manifest.sample_id[first]} ({manifest.rel_path[first]}) of "
                f"{manifest.path}; re-run `defuse decode {self.attrs['backbone']}` (or "
                "`dvc repro`)."
            )
        return squares


def read_image_cache(path: Path | str) -> ImageCache:
    """Open and check an image cache's structure; CacheError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path}: no such image cache")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: decode_attr(k, v) for k, v in f.attrs.items()}
            if attrs.get("image_schema") != SCHEMA:
                raise CacheError(
                    f"{path}: image_schema {attrs.get('image_schema')!r} is not {SCHEMA}; "
                    "not an image cache of this defuse"
                )
            missing = [k for k in ("backbone", *TARGET, "versions") if k not in attrs]
            missing += [d for d in ("sample_id", "channels", "pixels") if d not in f]
            if missing:
                raise CacheError(f"{path}: missing attributes / datasets {missing}")
            pixels, size = f["pixels"], attrs["input_size"]
            n = len(f["sample_id"])
            if pixels.dtype != np.uint8 or pixels.shape not in (
                (n, size, size, 1),
                (n, size, size, 3),
            ):
                raise CacheError(
                    f"{path}: pixels {pixels.dtype} {pixels.shape} are not {n} uint8 squares "
                    f"of {size} px"
                )
            ids, channels = f["sample_id"][()], f["channels"][()]
            depth = pixels.shape[3]
            if len(channels) != n or not np.isin(channels, (1, depth)).all():
                raise CacheError(f"{path}: channels must be 1 or {depth} per row")
            shape, identity = pixels.shape, file_identity(path, f)
    # h5py reports damaged metadata as any of these (see pipeline/storage/feature_cache.py)
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CacheError(f"{path}: not a readable HDF5 image cache ({e})") from None
    return ImageCache(path, attrs, ids.astype(_ID), channels, shape, identity)


def open_image_cache(path: Path | str, info: BackboneInfo) -> ImageCache:
    """The image cache at ``path``, which must hold ``info``'s squares: a CacheError naming
    both targets otherwise, never other pixels."""
    cache = read_image_cache(path)
    held, wanted = {k: cache.attrs[k] for k in TARGET}, target(info)
    if held != wanted:
        differ = ", ".join(f"{k} {held[k]!r}" for k in TARGET if held[k] != wanted[k])
        needs = ", ".join(f"{k} {wanted[k]!r}" for k in TARGET if held[k] != wanted[k])
        raise CacheError(
            f"{cache.path} holds squares of {differ}, but {info.name} is fine-tuned on {needs}; "
            f"re-run `defuse decode {info.name}` (or `dvc repro`)."
        )
    return cache


def usable_image_cache(path: Path | str, info: BackboneInfo) -> ImageCache | None:
    """The image cache at ``path`` if there is one for ``info``'s squares, else None (the
    images are then decoded); a damaged file is still an error."""
    if not Path(path).is_file():
        return None
    cache = read_image_cache(path)
    return cache if {k: cache.attrs[k] for k in TARGET} == target(info) else None


class Squares:
    """Image-cache rows by position: ``rows`` (n,) the file row of each image, -1 where the
    cache lacks it; ``channels`` (n,) its channels. The file is opened at the first read in
    each process (an open h5py handle does not survive a fork into loader workers) and must
    still be the file whose header was checked."""

    def __init__(self, path: Path, rows: np.ndarray, channels: np.ndarray, identity: tuple):
        self.path, self.rows, self.channels = Path(path), rows, channels
        self.identity = identity
        self._pixels, self._pid = None, None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:  # pickled into a spawned worker: it opens its own
        return {**self.__dict__, "_pixels": None, "_pid": None}

    def array(self, i: int) -> np.ndarray | None:
        """(S, S, C) uint8, C = 1 for a grey image; None where the cache lacks image ``i``."""
        row = int(self.rows[i])
        if row < 0:
            return None
        if self._pid != os.getpid():
            self._pixels, self._pid = self._open(), os.getpid()
        try:
            pixels = self._pixels[row]  # the whole row: one contiguous read
        except OSError as e:
            raise CacheError(
                f"{self.path}: cannot read row {row} ({e}); the file is corrupt"
            ) from None
        return pixels[..., : self.channels[i]]

    def image(self, i: int) -> Image.Image | None:
        """Image ``i`` as the loaders' transforms take it (L or RGB), or None."""
        pixels = self.array(i)
        if pixels is None:
            return None
        return Image.fromarray(
            np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        )

    def _open(self) -> h5py.Dataset:
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise CacheError(f"{self.path}: cannot be reopened to read rows ({e})") from None
        if file_identity(self.path, f) != self.identity:
            f.close()
            raise CacheError(
                f"{self.path}: replaced since its header was read (a `defuse decode` ran "
                "meanwhile?); run again"
            )
        return f["pixels"]


# ---------------------------------------------------------------------------- inspection


def is_image_cache(path: Path | str) -> bool:
    """Whether ``path`` is an HDF5 file that says it is an image cache (`image_schema`)."""
    try:
        with h5py.File(path, "r") as f:
            return "image_schema" in f.attrs
    except (OSError, KeyError, RuntimeError, ValueError, TypeError):
        return False


def image_cache_info(path: Path | str) -> dict:
    """Attributes, shape, size in bytes and grey / colour counts (pixels not read)."""
    cache = read_image_cache(path)
    grey = int((cache.channels == 1).sum())
    return dict(
        path=str(cache.path),
        attrs=cache.attrs,
        shape=cache.shape,
        bytes=cache.path.stat().st_size,
        images={"grey": grey, "colour": len(cache.channels) - grey},
    )


def verify_image_cache(path: Path | str, manifest: Manifest | None = None) -> list[str]:
    """Problems with an image cache, [] when sound: what read_image_cache refuses, rows that
    cannot be read, and (given ``manifest``) its images that the cache lacks."""
    try:
        cache = read_image_cache(path)
        squares = cache.squares_at(np.arange(len(cache.sample_id)))
        for i in range(len(squares)):
            squares.array(i)
        if manifest is not None:
            cache.manifest_squares(manifest, np.arange(len(manifest)))
    except CacheError as e:
        return [str(e)]
    return []
