"""Dataset sources, the manifest (cache/manifest.csv + manifest.json) and image decoding.

`build_manifest` checks every image once, collapses duplicates and draws stratified, seeded
splits; `write_manifest` writes the files atomically; `read_manifest` is what later stages use.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.resources
import io
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from pipeline.atomic import atomic_file
from pipeline.config import PrepareParams, asdict
from pipeline.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
COLUMNS = ("sample_id", "path", "label", "label_name", "split")
# Decoding after `prepare` (extract, predict): prepare.max_pixels checked the manifest's images.
DEFAULT_MAX_PIXELS = 64_000_000

# ELPV defect probability 0, 1/3, 2/3, 1 (four classes) or p < 0.5 vs p >= 0.5 (two).
ELPV_CLASSES = {
    4: ("functional", "possibly_defective", "likely_defective", "defective"),
    2: ("functional", "defective"),
}
_MAX_LISTED = 20  # problems listed in one error message before "and N more"
_CHECK_SIZE = 1  # draft target of the checking pass: the smallest JPEG scale, still a full read


class ManifestRow(NamedTuple):
    sample_id: str  # sha256 hex of the file bytes
    path: str  # relative to the dataset root, forward slashes
    label: int
    label_name: str
    split: str


@dataclass(frozen=True)
class PreparedManifest:
    """What `build_manifest` found; `write_manifest` turns it into files."""

    params: PrepareParams
    root: Path  # resolved image root
    class_names: tuple[str, ...]
    rows: tuple[ManifestRow, ...]  # sorted by path
    skipped: tuple[tuple[str, str], ...]  # (path, reason), only when on_bad_image is "skip"
    duplicates: tuple[tuple[str, str], ...]  # (kept path, dropped path), same class
    stratified_by: tuple[str, ...]  # ("class",) or ("class", "cell_type") for ELPV

    def counts(self) -> dict[str, dict]:
        """Per split, per class and per split x class image counts."""
        by_split = Counter(r.split for r in self.rows)
        by_class = Counter(r.label_name for r in self.rows)
        pairs = Counter((r.split, r.label_name) for r in self.rows)
        return {
            "split": {s: by_split[s] for s in SPLITS},
            "class": {c: by_class[c] for c in self.class_names},
            "split_class": {s: {c: pairs[s, c] for c in self.class_names} for s in SPLITS},
        }


@dataclass(frozen=True, eq=False)
class Manifest:
    """A checked manifest: parallel per-sample columns of length n_samples."""

    path: Path  # the csv
    root: Path  # resolved absolute image root
    class_names: tuple[str, ...]
    sample_id: tuple[str, ...]
    rel_path: tuple[str, ...]
    label: np.ndarray  # (n_samples,) int64
    split: tuple[str, ...]
    sha256: str  # of the csv bytes; feature caches record it
    source: str  # "elpv" or "folder", from manifest.json

    def __len__(self) -> int:
        return len(self.sample_id)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def image_path(self, i: int) -> Path:
        return self.root / self.rel_path[i]

    def indices(self, split: str) -> np.ndarray:
        """Row indices (n_split,) int64 of ``split``, in manifest order."""
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {list(SPLITS)}. Got {split!r} instead.")
        return np.array([i for i, s in enumerate(self.split) if s == split], dtype=np.int64)


# --- image decoding ---------------------------------------------------------------------------


def load_image(
    path: Path | str,
    size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_gray: bool = False,
) -> Image.Image:
    """Decode ``path`` fully into an RGB image; raise DataError naming the path if it cannot.

    ``size``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides >= ``size`` (`Image.draft`), so a 2560x1920 original decodes fast; nothing is
    resized here, other formats come back at full size. Images whose header says more than
    ``max_pixels`` pixels are refused before decoding (decompression-bomb guard); truncated
    files are errors, never padded.

    Mode policy (pixels as stored; EXIF orientation is not applied; first frame only):
      RGB as is; L and 1 replicated to three channels (1 -> 0 / 255);
      16-bit (I;16, I;16B, ...) -> value >> 8; I (32-bit) -> clip to 0..65535, then >> 8;
      F -> clip to 0..255 and round (Pillow's conversion);
      P -> its palette colours; P with transparency, RGBA, LA, PA -> composited on black,
      i.e. round(rgb * alpha / 255); CMYK -> Pillow's CMYK->RGB; other modes
      (YCbCr, ...) -> Pillow's convert("RGB"), a DataError where Pillow has none.
    ``keep_gray``: single-channel sources (1, L, I, I;16, F) come back as the L image that
    the policy would replicate: the loaders resize one channel, not three, and expand later.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image file: {exc.strerror or exc}") from exc
    return _decode(data, path, size, max_pixels, keep_gray)


def _decode(
    data: bytes, name: Path | str, size: int | None, max_pixels: int, keep_gray: bool = False
) -> Image.Image:
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
    """A single-channel image as 8-bit L, per `load_image`'s policy."""
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


# --- sources ----------------------------------------------------------------------------------


class _Entry(NamedTuple):
    path: str  # relative, forward slashes
    label: int
    group: str  # extra stratification key ("" for folders; cell type for ELPV)


def elpv_root() -> Path:
    """The elpv-dataset package's data folder (labels.csv + images/)."""
    try:
        return Path(str(importlib.resources.files("elpv_dataset") / "data")).resolve()
    except ModuleNotFoundError as exc:
        raise DataError(
            "prepare.source 'elpv' needs the elpv-dataset package: pip install elpv-dataset."
        ) from exc


def _elpv_entries(n_classes: int) -> tuple[Path, tuple[str, ...], list[_Entry]]:
    """Read labels.csv (`images/cell0001.png  1.0  mono`) without decoding any image."""
    root = elpv_root()
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DataError(f"{labels}: the elpv-dataset label file is missing.")
    entries = []
    for lineno, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            raise DataError(f"{labels}, line {lineno}: expected 'path probability type'.")
        rel, prob, cell_type = fields[0], _float(fields[1]), fields[2]
        level = round(prob * 3)
        if abs(prob * 3 - level) > 1e-6 or not 0 <= level <= 3:
            raise DataError(f"{labels}, line {lineno}: probability {prob} is not 0, 1/3, 2/3, 1.")
        label = level if n_classes == 4 else int(prob >= 0.5)
        entries.append(_Entry(rel, label, cell_type))
    return root, ELPV_CLASSES[n_classes], entries


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return -1.0  # fails the 0, 1/3, 2/3, 1 check, which names the line


def _folder_entries(
    root_given: str, classes: Sequence[str] | None
) -> tuple[Path, tuple[str, ...], list[_Entry]]:
    """root/<class>/**/<file>; hidden files and folders are ignored, every other file counts."""
    root = Path(root_given).resolve()
    if not root.is_dir():
        raise DataError(f"prepare.root {root_given!r}: no such folder ({root}).")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        missing = [c for c in classes if c not in found]
        if missing:
            raise DataError(
                f"prepare.classes lists {missing} but {root} has no such sub-folder(s); "
                f"found {found}."
            )
        if len(set(classes)) != len(classes):
            raise DataError(f"prepare.classes has repeated names: {list(classes)}.")
    class_names = tuple(classes) if classes else tuple(found)
    if len(class_names) < 2:
        raise DataError(
            f"{root}: needs at least 2 class sub-folders (root/<class>/<image>); "
            f"found {list(class_names)}."
        )
    entries = []
    for label, name in enumerate(class_names):
        files = []
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
        if not files:
            raise DataError(f"{root / name}: class folder {name!r} holds no files.")
        entries += [_Entry(f.relative_to(root).as_posix(), label, "") for f in files]
    return root, class_names, entries


# --- building the manifest --------------------------------------------------------------------


def build_manifest(
    params: PrepareParams,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> PreparedManifest:
    """Check every image, collapse duplicates and draw stratified, seeded splits.

    Every file is read and decoded once (JPEGs at reduced DCT scale); ``progress`` wraps the
    iterable of that pass (e.g. tqdm). Raises DataError listing every bad image (mode
    "error"), each cross-class duplicate, and any class too small for three splits.
    Rows are sorted by path, so the csv does not reorder when only the seed changes.
    """
    if params.source == "elpv":
        root, class_names, entries = _elpv_entries(params.elpv_classes)
        stratified_by = ("class", "cell_type")
    else:
        root, class_names, entries = _folder_entries(params.root, params.classes)
        stratified_by = ("class",)
    entries.sort(key=lambda e: e.path)

    hashes, bad = [], []
    for entry in progress(entries) if progress else entries:
        try:
            data = (root / entry.path).read_bytes()
            _decode(data, entry.path, _CHECK_SIZE, params.max_pixels)
            hashes.append(hashlib.sha256(data).hexdigest())
        except (OSError, DataError) as exc:
            reason = str(exc).removeprefix(f"{entry.path}: ")
            bad.append((entry.path, reason))
            hashes.append(None)
    if bad and params.on_bad_image == "error":
        raise DataError(
            _listing(f"{len(bad)} bad image(s) under {root}", [f"{p}: {r}" for p, r in bad])
            + "\nFix or remove them, or set prepare.on_bad_image: skip."
        )

    kept, duplicates, clashes, first = [], [], [], {}
    for entry, sha in zip(entries, hashes, strict=True):
        if sha is None:
            continue
        if sha not in first:
            first[sha] = entry
            kept.append((entry, sha))
        elif first[sha].label == entry.label:
            duplicates.append((first[sha].path, entry.path))
        else:
            other = first[sha]
            clashes.append(
                f"{other.path} ({class_names[other.label]}) = {entry.path} "
                f"({class_names[entry.label]})"
            )
    if clashes:
        raise DataError(
            _listing(f"{len(clashes)} identical file(s) labelled with different classes", clashes)
        )
    if duplicates:
        warnings.warn(
            _listing(
                f"{len(duplicates)} duplicate image(s) collapsed within their class "
                "(kept = dropped)",
                [f"{a} = {b}" for a, b in duplicates],
            ),
            stacklevel=2,
        )

    splits = _stratified_splits([(e.label, e.group) for e, _ in kept], class_names, params)
    rows = tuple(
        ManifestRow(sha, e.path, e.label, class_names[e.label], s)
        for (e, sha), s in zip(kept, splits, strict=True)
    )
    return PreparedManifest(
        params=params,
        root=root,
        class_names=class_names,
        rows=rows,
        skipped=tuple(bad),
        duplicates=tuple(duplicates),
        stratified_by=stratified_by,
    )


def _stratified_splits(
    keys: list[tuple[int, str]],
    class_names: tuple[str, ...],
    params: PrepareParams,
) -> list[str]:
    """One split name per key; every stratum (class, or class x cell type) in every split."""
    t, v = params.test_fraction, params.val_fraction
    needed = max(3, math.ceil(1 / min(t, (1 - t) * v, (1 - t) * (1 - v)) - 1e-9))
    strata = [f"{label}|{group}" for label, group in keys]
    counts = Counter(strata)
    present = Counter(label for label, _ in keys)

    def describe(stratum: str) -> str:
        label, group = stratum.split("|")
        name = class_names[int(label)]
        return f"class {name!r} ({group} cells)" if group else f"class {name!r}"

    small = [s for s in sorted(counts) if counts[s] < needed]
    small += [f"{i}|" for i in range(len(class_names)) if present[i] == 0]
    if small:
        raise DataError(
            "Too few images to stratify: "
            + "; ".join(f"{describe(s)} has {counts[s]}" for s in small)
            + f". With test_fraction={t} and val_fraction={v} each needs at least {needed} "
            "so that train, val and test all get one; add images or raise the fractions."
        )
    index = np.arange(len(keys))
    strata_arr = np.array(strata)
    rest, test = train_test_split(index, test_size=t, stratify=strata_arr, random_state=params.seed)
    train, val = train_test_split(
        rest, test_size=v, stratify=strata_arr[rest], random_state=params.seed
    )
    split = np.empty(len(keys), dtype=object)
    for name, members in zip(SPLITS, (train, val, test), strict=True):
        split[members] = name
        missing = sorted(set(counts) - set(strata_arr[members]))
        if missing:  # rounding in the splitter; rare once every stratum has `needed`
            raise DataError(
                f"The stratified split left no {name} image for "
                + ", ".join(f"{describe(s)} ({counts[s]} images)" for s in missing)
                + "; add images or raise the fractions."
            )
    return list(split)


def _listing(title: str, lines: list[str]) -> str:
    shown = lines[:_MAX_LISTED]
    more = len(lines) - len(shown)
    return f"{title}:\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")


# --- files ------------------------------------------------------------------------------------


def manifest_json_path(csv_path: Path | str) -> Path:
    return Path(csv_path).with_suffix(".json")


def skipped_path(csv_path: Path | str) -> Path:
    return Path(csv_path).with_name("skipped.csv")


def write_manifest(csv_path: Path | str, prepared: PreparedManifest) -> tuple[Path, Path, Path]:
    """Write the csv, its json sidecar and skipped.csv (always, possibly header-only).

    Identical inputs give identical bytes ("\\n" line endings, no timestamps). Each file is
    written to a temporary file in the same folder; all are renamed into place once all
    are written.
    Returns (csv, json, skipped) paths.
    """
    csv_path = Path(csv_path)
    params = prepared.params
    meta = {
        "source": params.source,
        "root": params.root if params.source == "folder" else None,
        "class_names": list(prepared.class_names),
        "n_samples": len(prepared.rows),
        "counts": prepared.counts(),
        "stratified_by": list(prepared.stratified_by),
        "skipped": len(prepared.skipped),
        "duplicates_collapsed": len(prepared.duplicates),
        "params": asdict(params),
    }
    files = {
        csv_path: _csv_text(COLUMNS, prepared.rows),
        manifest_json_path(csv_path): json.dumps(meta, indent=2) + "\n",
        skipped_path(csv_path): _csv_text(("path", "reason"), prepared.skipped),
    }
    with contextlib.ExitStack() as stack:  # every file written before any is renamed
        for target, text in files.items():
            tmp = stack.enter_context(atomic_file(target))
            tmp.write_text(text, encoding="utf-8", newline="")
    return tuple(files)


def _csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def read_manifest(csv_path: Path | str) -> Manifest:
    """Read and check a manifest; the image root comes from the json sidecar.

    A folder root given relative in params is resolved against the current directory.
    Raises DataError naming the file and row for a wrong header, a label that disagrees
    with label_name, an unknown split or a repeated sample_id or path.
    """
    csv_path = Path(csv_path)
    json_path = manifest_json_path(csv_path)
    try:
        raw = csv_path.read_bytes()
        meta = json.loads(json_path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: not found; run `defuse prepare` first.") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{json_path}: not valid JSON: {exc}") from exc
    class_names = tuple(meta.get("class_names") or ())
    if len(class_names) < 2:
        raise DataError(f"{json_path}: 'class_names' must list at least 2 classes.")
    if meta.get("source") == "elpv":
        root = elpv_root()
    elif meta.get("root"):
        root = Path(meta["root"]).resolve()
    else:
        raise DataError(f"{json_path}: source {meta.get('source')!r} without a 'root'.")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not UTF-8 text: {exc}") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = tuple(next(reader, ()))
    if header != COLUMNS:
        raise DataError(f"{csv_path}: columns must be {list(COLUMNS)}; got {list(header)}.")
    sample_id, rel_path, label, split = [], [], [], []
    seen_id, seen_path = {}, {}
    for line, row in enumerate(reader, start=2):
        where = f"{csv_path}, row {line}"
        if len(row) != len(COLUMNS):
            raise DataError(f"{where}: expected {len(COLUMNS)} fields, got {len(row)}.")
        sid, path, lab, name, sp = row
        try:
            lab = int(lab)
        except ValueError:
            raise DataError(f"{where}: label {lab!r} is not an integer.") from None
        if not 0 <= lab < len(class_names) or class_names[lab] != name:
            raise DataError(
                f"{where}: label {lab} and label_name {name!r} disagree with class_names "
                f"{list(class_names)} in {json_path.name}."
            )
        if len(sid) != 64 or sid.strip("0123456789abcdef"):
            raise DataError(f"{where}: sample_id {sid!r} is not a sha256 hex digest.")
        if sp not in SPLITS:
            raise DataError(f"{where}: split {sp!r} is not one of {list(SPLITS)}.")
        for value, seen, what in ((sid, seen_id, "sample_id"), (path, seen_path, "path")):
            if value in seen:
                raise DataError(f"{where}: {what} {value!r} repeats row {seen[value]}.")
            seen[value] = line
        sample_id.append(sid)
        rel_path.append(path)
        label.append(lab)
        split.append(sp)
    if not sample_id:
        raise DataError(f"{csv_path}: the manifest has no rows.")
    return Manifest(
        path=csv_path,
        root=root,
        class_names=class_names,
        sample_id=tuple(sample_id),
        rel_path=tuple(rel_path),
        label=np.array(label, dtype=np.int64),
        split=tuple(split),
        sha256=hashlib.sha256(raw).hexdigest(),
        source=meta["source"],
    )
