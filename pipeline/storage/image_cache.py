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
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from pipeline.data.images import decoded_channels, load_image
from pipeline.data.manifest import Manifest
from pipeline.errors import CacheError
from pipeline.models.preprocessing import Preprocessing
from pipeline.progress import Progress
from pipeline.storage import rowstore
from pipeline.storage.rowstore import Column, RowsWritten, Schema

SCHEMA = 2  # the `image_schema` attribute; 2: the preprocessing record whole, digests
# What fixes a row's pixels besides the file: the preprocessing record (the square it is
# brought to) and the library that decodes and resamples (`Preprocessing.square`: Pillow).
IDENTITY = ("preprocessing", "versions")
LIBRARIES = ("pillow",)
IMAGES = Schema(
    kind="image cache",
    marker="image_schema",
    version=SCHEMA,
    columns=(
        Column("sample_id", "S", 1),
        Column("channels", "u", 1),
        Column("pixels", "u", 4, small=False),
    ),
    attrs=("backbone", *IDENTITY),
    identity=IDENTITY,
    rerun="defuse decode BACKBONE",
)
_BLOCK_ROWS = 16  # per decoding process: rows assembled in memory and written at a time


def _versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def _square(
    path: Path, sample_id: str, preprocessing: Preprocessing, max_pixels: int
) -> np.ndarray:
    """(S, S, C) uint8: the file decoded as the loaders decode it and brought to the square;
    C = 1 for a grey image. A file that no longer hashes to its sample id is refused."""
    size = preprocessing.input_size
    image = load_image(path, max_pixels=max_pixels, size=size, keep_gray=True, sha256=sample_id)
    pixels = np.asarray(preprocessing.square(image))
    return pixels[..., None] if pixels.ndim == 2 else pixels


def decode_images(
    manifest: Manifest,
    backbone: str,
    preprocessing: Preprocessing,
    out: Path,
    workers: int | None = None,
    progress: bool = True,
) -> RowsWritten:
    """Write the image cache ``out``: one row per manifest image, in manifest order.

    Datasets `sample_id` (N,), `channels` (N,) uint8 (1 or 3: the image's own), `pixels`
    (N, S, S, C) uint8 (C = 3 when any image is in colour, else 1; a grey row fills channel
    0); attributes `image_schema`, `backbone`, `preprocessing` (the record's JSON), `versions`
    (LIBRARIES) and `digests`. Rows of samples in the previous ``out`` made with the same
    record and libraries are copied (after its digests are checked); only the others are
    decoded, by ``workers`` processes (None: every core this process may use).
    """
    out, n, size = Path(out), len(manifest), preprocessing.input_size
    wanted = {"preprocessing": preprocessing, "versions": _versions()}
    old = rowstore.reusable(_sound_image_cache, out, IMAGES, wanted)
    old_row = old.rows_for(manifest.sample_id) if old else np.full(n, -1, np.int64)
    new = np.flatnonzero(old_row < 0)
    channels = np.zeros(n, np.uint8)
    if old:
        channels[old_row >= 0] = old.channels[old_row[old_row >= 0]]
    channels[new] = [decoded_channels(manifest.image_path(int(r))) for r in new]
    shapes = dict(sample_id=((), rowstore.ID_DTYPE), channels=((), np.uint8),
                  pixels=((size, size, int(channels.max(initial=1))), np.uint8))  # fmt: skip
    workers = workers or len(os.sched_getaffinity(0))
    parallel = workers > 1 and len(new) > 1
    reused = old.squares_at(old_row) if old else None
    bar = Progress(len(new), f"decode {backbone}", "img", enabled=progress)
    with (
        ProcessPoolExecutor(workers) if parallel else contextlib.nullcontext() as pool,
        rowstore.RowWriter(out, IMAGES, n, shapes, {"backbone": backbone, **wanted}) as writer,
        bar,
    ):
        run = pool.map if parallel else map
        for start in range(0, n, _BLOCK_ROWS * workers):
            rows = np.arange(start, min(start + _BLOCK_ROWS * workers, n))
            chunk = np.zeros((len(rows), *shapes["pixels"][0]), np.uint8)
            for r in rows[old_row[rows] >= 0]:
                chunk[r - start, ..., : channels[r]] = reused.array(r)
            todo = rows[old_row[rows] < 0]
            paths = [manifest.image_path(int(r)) for r in todo]
            ids = [manifest.sample_id[r] for r in todo]
            limits = [manifest.max_pixels] * len(todo)
            squares = run(_square, paths, ids, [preprocessing] * len(todo), limits)
            for r, square in zip(todo, squares, strict=True):
                if square.shape != (size, size, channels[r]):  # the header said otherwise
                    raise CacheError(
                        f"{manifest.image_path(int(r))}: decoded to shape {square.shape}, not "
                        f"the {(size, size, int(channels[r]))} its header announced"
                    )
                chunk[r - start, ..., : channels[r]] = square
                bar.update()
            ids = rowstore.ids_to_bytes([manifest.sample_id[r] for r in rows], manifest.path)
            writer.write(start, dict(sample_id=ids, channels=channels[rows], pixels=chunk))
    return RowsWritten(out, n, n - len(new), len(new))


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

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_json(self.attrs["preprocessing"], f"{self.path}: preprocessing")

    def rows_for(self, sample_ids: Sequence[str]) -> np.ndarray:
        """(M,) int64: the row of each sample id, -1 where this cache has none."""
        return rowstore.rows_for(self.sample_id, sample_ids)

    def squares(self, sample_ids: Sequence[str]) -> Squares:
        """The rows of ``sample_ids``, in order; those it lacks are decoded by the loaders."""
        return self.squares_at(self.rows_for(sample_ids))

    def squares_at(self, rows: np.ndarray) -> Squares:
        """`Squares` of file ``rows`` (n,), -1 for an image the cache lacks. The pixels are
        checked against their digest first, once per process and file."""
        self.verify_pixels()
        channels = np.where(rows >= 0, self.channels[rows.clip(0)], 0)
        return Squares(self.path, rows, channels, self.identity)

    def verify_pixels(self, again: bool = False) -> None:
        """CacheError unless the pixels match their digest (read whole, by row ranges)."""
        f = rowstore.reopen(self.path, self.identity)
        with rowstore.Store(self.path, IMAGES, f, self.attrs, {}, self.identity) as store:
            store.verify("pixels", again)

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
    """Open and check an image cache's header, ids and channels (`rowstore.open_store`: a
    regular file, layout inside it, digests); CacheError naming the file otherwise."""
    with rowstore.open_store(path, IMAGES) as store:
        try:
            return _checked(store)
        except rowstore.H5_ERRORS as e:
            raise CacheError(f"{store.path}: unreadable image cache ({e})") from None


def _sound_image_cache(path: Path) -> ImageCache:
    """read_image_cache with the pixels checked against their digest too."""
    cache = read_image_cache(path)
    cache.verify_pixels()
    return cache


def _checked(store: rowstore.Store) -> ImageCache:
    path, channels, pixels = store.path, store.columns["channels"], store.file["pixels"]
    size = Preprocessing.from_json(
        store.attrs["preprocessing"], f"{path}: preprocessing"
    ).input_size
    n = len(store.sample_id)
    if pixels.dtype != np.uint8 or pixels.shape not in ((n, size, size, 1), (n, size, size, 3)):
        raise CacheError(
            f"{path}: pixels {pixels.dtype} {pixels.shape} are not {n} uint8 squares of {size} px"
        )
    depth = pixels.shape[3]
    if not np.isin(channels, (1, depth)).all():
        raise CacheError(f"{path}: channels must be 1 or {depth} per row")
    return ImageCache(path, store.attrs, store.sample_id, channels, pixels.shape, store.identity)


def _differ(held: Preprocessing, wanted: Preprocessing) -> tuple[str, str]:
    names = [
        f.name for f in fields(Preprocessing) if getattr(held, f.name) != getattr(wanted, f.name)
    ]
    return tuple(", ".join(f"{k} {getattr(p, k)!r}" for k in names) for p in (held, wanted))


def open_image_cache(path: Path | str, preprocessing: Preprocessing, backbone: str) -> ImageCache:
    """The image cache at ``path``, which must hold the squares of ``preprocessing`` (records
    compared whole): a CacheError naming both otherwise, never other pixels."""
    cache = read_image_cache(path)
    if cache.preprocessing != preprocessing:
        held, wanted = _differ(cache.preprocessing, preprocessing)
        raise CacheError(
            f"{cache.path} holds squares of {held}, but {backbone} is fine-tuned on {wanted}; "
            f"re-run `defuse decode {backbone}` (or `dvc repro`)."
        )
    return cache


def usable_image_cache(path: Path | str, preprocessing: Preprocessing) -> ImageCache | None:
    """The image cache at ``path`` if there is one for ``preprocessing``'s squares, else None
    (the images are then decoded); a damaged file is still an error."""
    if not Path(path).exists():
        return None
    cache = read_image_cache(path)
    return cache if cache.preprocessing == preprocessing else None


class Squares:
    """Image-cache rows by position: ``rows`` (n,) the file row of each image, -1 where the
    cache lacks it; ``channels`` (n,) its channels. The file is opened at the first read in
    each process (an open h5py handle does not survive a fork into loader workers) and must
    still be the file whose header and digests were checked."""

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
            self._pixels = rowstore.reopen(self.path, self.identity)["pixels"]
            self._pid = os.getpid()
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


# ---------------------------------------------------------------------------- inspection


def is_image_cache(path: Path | str) -> bool:
    """Whether ``path`` is a regular HDF5 file that says it is an image cache (`image_schema`)."""
    if not Path(path).is_file():  # a FIFO or device is neither cache: never opened here
        return False
    try:
        with h5py.File(path, "r") as f:
            return IMAGES.marker in f.attrs
    except rowstore.H5_ERRORS:
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
    """Problems with an image cache, [] when sound: what read_image_cache refuses, pixels
    that do not match their digest (recomputed), and (given ``manifest``) its images that
    the cache lacks."""
    try:
        cache = read_image_cache(path)
        cache.verify_pixels(again=True)
        if manifest is not None:
            cache.manifest_squares(manifest, np.arange(len(manifest)))
    except CacheError as e:
        return [str(e)]
    return []
