"""Image files read safely and decoded to 8-bit RGB (or L) by one mode policy.

Imports only numpy, Pillow, the standard library and pipeline.errors: the torch-free
deployment runtime decodes its inputs with this very code.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import DataError

_KINDS = {  # what a path names when it is not a regular file, for the message
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def regular_file_problem(path: Path | str) -> str | None:
    """None if ``path`` resolves to a regular file, else what is wrong ("no such file", "a
    FIFO (named pipe), not a regular file", ...). Nothing is opened: opening a FIFO blocks,
    /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks: what would be opened
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISREG(mode):
        return None
    return f"{_KINDS.get(stat.S_IFMT(mode), 'a special file')}, not a regular file"


def check_regular_file(path: Path | str) -> int:
    """The size of the regular file ``path`` resolves to; DataError naming it otherwise."""
    problem = regular_file_problem(path)
    if problem:
        raise DataError(f"{path}: cannot read image file: {problem}.")
    return os.stat(path).st_size


def read_image_bytes(path: Path | str) -> bytes:
    """The bytes of the regular file ``path`` (`check_regular_file`), read up to the size it
    had when checked: a file that grows meanwhile cannot make the read unbounded."""
    size = check_regular_file(path)
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError as exc:
        raise DataError(f"{path}: cannot read image file: {exc.strerror or exc}") from exc


def load_image(
    path: Path | str,
    *,
    max_pixels: int,
    size: int | None = None,
    keep_gray: bool = False,
    sha256: str | None = None,
) -> Image.Image:
    """Decode the regular file ``path`` fully into an RGB image (`decode_image`); DataError
    naming the path if it cannot.

    ``max_pixels``: prepare.max_pixels, the one bound (after `prepare`, the manifest's
    `Manifest.max_pixels`). ``sha256``: the file's manifest ``sample_id``; bytes that hash
    otherwise (the file changed since `defuse prepare`) are a DataError, so what is stored
    under that id is that file.
    """
    data = read_image_bytes(path)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(
            f"{path}: its bytes no longer hash to its sample_id {sha256} in the manifest: the "
            "file changed since `defuse prepare`; run it again (or `dvc repro`)."
        )
    return decode_image(data, path, max_pixels=max_pixels, size=size, keep_gray=keep_gray)


def decoded_channels(path: Path | str) -> int:
    """Channels of ``load_image(path, keep_gray=True)``: 1 (an L image) or 3, from the
    file's header alone; DataError naming the path if it is not an image."""
    check_regular_file(path)
    try:
        with Image.open(path) as im:
            return 1 if _is_gray(im.mode) else 3
    except OSError as exc:  # Pillow's UnidentifiedImageError included
        raise DataError(f"{path}: cannot read the image header: {exc}") from exc


def decode_image(
    data: bytes,
    name: Path | str,
    *,
    max_pixels: int,
    size: int | None = None,
    keep_gray: bool = False,
) -> Image.Image:
    """Decode the file bytes ``data`` (``name`` is for messages) fully; DataError if not.

    ``size``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides >= ``size`` (`Image.draft`), so a 2560x1920 original decodes fast; nothing is
    resized here, other formats come back at full size. Images whose header says more than
    ``max_pixels`` pixels are refused before decoding (decompression-bomb guard); truncated
    files are errors, never padded.

    Mode policy (pixels as stored; EXIF orientation is not applied, so a file means the same
    pixels to every reader; first frame only):
      RGB as is; L and 1 replicated to three channels (1 -> 0 / 255);
      16-bit (I;16, I;16B, ...) -> value >> 8; I (32-bit) -> clip to 0..65535, then >> 8;
      F -> clip to 0..255 and round (Pillow's conversion);
      P -> its palette colours; P with transparency, RGBA, LA, PA -> composited on black,
      i.e. round(rgb * alpha / 255); CMYK -> Pillow's CMYK->RGB; other modes
      (YCbCr, ...) -> Pillow's convert("RGB"), a DataError where Pillow has none.
    ``keep_gray``: single-channel sources (1, L, I, I;16, F) come back as the L image that
    the policy would replicate: the loaders resize one channel, not three, and expand later.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise DataError(
                    f"{name}: {width}x{height} = {width * height} pixels exceeds "
                    f"max_pixels={max_pixels} (decompression-bomb guard)."
                )
            if size is not None:
                im.draft("RGB", (size, size))  # a no-op for formats other than JPEG
            im.load()
            if _is_gray(im.mode):
                gray = _to_gray(im)
                return gray if keep_gray else gray.convert("RGB")
            return _to_rgb(im)
    except DataError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise DataError(f"{name}: not an image (no known format).") from exc
    except Exception as exc:  # Pillow raises a zoo of types for corrupt data
        raise DataError(f"{name}: cannot decode image: {type(exc).__name__}: {exc}") from exc


def _is_gray(mode: str) -> bool:
    return mode in ("1", "L", "I", "F") or mode.startswith("I;16")


def _to_gray(im: Image.Image) -> Image.Image:
    """A single-channel image as 8-bit L, per `decode_image`'s policy."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im)
        return Image.fromarray((np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8), "L")
    return im.copy() if im.mode == "L" else im.convert("L")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode == "P" and "transparency" not in im.info:
        return im.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)
        rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    return im.convert("RGB")


def walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted; hidden files and folders (".*") are ignored.
    DataError naming the first that is not a regular file (a FIFO, a device, a link to one):
    it is never opened."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    for path in found:
        check_regular_file(path)
    return found
