"""Dataset sources, the manifest (cache/manifest.csv + manifest.json) and image decoding.

Sources: the ELPV package, an image folder (one sub-folder per class) or a labels file (csv).
`build_manifest` checks every image once, collapses duplicates, groups near-duplicates and
draws stratified, seeded splits; `write_manifest` writes the files atomically;
`read_manifest` is what later stages use.
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
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline.config import PrepareParams, asdict
from pipeline.data.dedupe import HASH_INPUT, groups_of, near_duplicate_pairs, perceptual_hash
from pipeline.errors import ConfigError, DataError
from pipeline.storage.atomic import atomic_file

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
    near_duplicates: tuple[tuple[str, ...], ...]  # paths of each near-duplicate group, sorted
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
    source: str  # "elpv", "folder" or "csv", from manifest.json

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
    sha256: str | None = None,
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
    ``sha256``: the file's manifest ``sample_id``; bytes that hash otherwise (the file changed
    since `defuse prepare`) are a DataError, so what is stored under that id is that file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image file: {exc.strerror or exc}") from exc
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(
            f"{path}: its bytes no longer hash to its sample_id {sha256} in the manifest: the "
            "file changed since `defuse prepare`; run it again (or `dvc repro`)."
        )
    return _decode(data, path, size, max_pixels, keep_gray)


def decoded_channels(path: Path | str) -> int:
    """Channels of ``load_image(path, keep_gray=True)``: 1 (an L image) or 3, from the
    file's header alone; DataError naming the path if it is not an image."""
    try:
        with Image.open(path) as im:
            return 1 if _is_gray(im.mode) else 3
    except OSError as exc:  # Pillow's UnidentifiedImageError included
        raise DataError(f"{path}: cannot read the image header: {exc}") from exc


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
    split: str  # given by a labels file; "" = drawn by `build_manifest`


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
        entries.append(_Entry(rel, label, cell_type, ""))
    return root, ELPV_CLASSES[n_classes], entries


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return -1.0  # fails the 0, 1/3, 2/3, 1 check, which names the line


def _folder_entries(
    params: PrepareParams,
) -> tuple[Path, tuple[str, ...], list[_Entry]]:
    """root/<class>/**/<file>; hidden files and folders are ignored, every other file that
    passes prepare.include / exclude (matched within its class folder) counts."""
    root_given, classes = params.root, params.classes
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
    class_names = _class_names(
        classes, found, f"{root}: needs at least 2 class sub-folders (root/<class>/<image>)"
    )
    entries = []
    for label, name in enumerate(class_names):
        folder, files = root / name, []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files += [
                Path(dirpath, f).relative_to(folder).as_posix()
                for f in filenames
                if not f.startswith(".")
            ]
        if not files:
            raise DataError(f"{folder}: class folder {name!r} holds no files.")
        chosen = [f for f in files if _selected(f, params)]
        if not chosen:
            raise DataError(
                f"{folder}: none of the {len(files)} file(s) of class folder {name!r} passes "
                f"{_patterns(params)}."
            )
        entries += [_Entry(f"{name}/{f}", label, "", "") for f in chosen]
    return root, class_names, entries


def _class_names(
    classes: Sequence[str] | None, found: Iterable[str], where: str
) -> tuple[str, ...]:
    """``classes`` if given (label order), else the sorted ``found``; at least two."""
    if classes and len(set(classes)) != len(classes):
        raise DataError(f"prepare.classes has repeated names: {list(classes)}.")
    class_names = tuple(classes) if classes else tuple(sorted(found))
    if len(class_names) < 2:
        raise DataError(f"{where}; found {list(class_names)}.")
    return class_names


def _selected(rel_path: str, params: PrepareParams) -> bool:
    """Whether a file passes prepare.include (any of them; all files when null) and no
    prepare.exclude. A pattern with a "/" is matched against ``rel_path`` (within the class
    folder, or as the labels file writes it), one without against the file name; fnmatch
    syntax ("*" also crosses "/"), case-sensitive."""
    name = rel_path.rsplit("/", 1)[-1]

    def hit(patterns: Sequence[str]) -> bool:
        return any(fnmatchcase(rel_path if "/" in p else name, p) for p in patterns)

    return (not params.include or hit(params.include)) and not (
        params.exclude and hit(params.exclude)
    )


def _patterns(params: PrepareParams) -> str:
    given = [(k, getattr(params, k)) for k in ("include", "exclude") if getattr(params, k)]
    return " and ".join(f"prepare.{k} {list(v)}" for k, v in given)


def _csv_entries(params: PrepareParams) -> tuple[Path, tuple[str, ...], list[_Entry]]:
    """The labels file: a header naming `path` and `label`, optionally `split` (any order).

    Image paths are relative to the labels file's folder and stay inside it. Every bad row
    (missing file, empty label, unknown split, repeated path, wrong field count) is listed
    at once with its line number; rows that prepare.include / exclude leave out are checked
    for their path only. With prepare.classes, rows of other labels are left out (a warning
    counts them).
    """
    labels = Path(params.labels)
    try:
        text = labels.read_text(encoding="utf-8-sig")  # Excel writes a byte-order mark
    except OSError as exc:
        raise DataError(
            f"prepare.labels {params.labels!r}: cannot read the labels file: {exc.strerror or exc}."
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{labels}: not UTF-8 text: {exc}") from exc
    root = labels.parent.resolve()
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader, [])]
    if sorted(header) not in (["label", "path"], ["label", "path", "split"]):
        raise DataError(
            f"{labels}, line 1: the header must name the columns path and label, and "
            f"optionally split; got {header}."
        )
    rows, bad, seen, left_out = [], [], {}, Counter()
    for record in reader:
        line = reader.line_num
        if not any(field.strip() for field in record):
            continue
        if len(record) != len(header):
            bad.append(f"line {line}: expected {len(header)} fields, got {len(record)}")
            continue
        row = dict(zip(header, (field.strip() for field in record), strict=True))
        given, label, split = row["path"], row["label"], row.get("split", "")
        path = PurePosixPath(given)
        if not given or path.is_absolute() or ".." in path.parts:
            bad.append(f"line {line}: path {given!r} must be relative to {root}, inside it")
            continue
        rel = path.as_posix()  # "./a.png" and "a.png" are one file
        if rel in seen:
            bad.append(f"line {line}: path {given!r} repeats line {seen[rel]}")
            continue
        seen[rel] = line
        if not _selected(rel, params):
            left_out[label] += 1
            continue
        problems = [f"{given}: no such file"] if not (root / rel).is_file() else []
        if not label:
            problems.append("empty label")
        if split not in ("", *SPLITS):
            problems.append(f"split {split!r} is not one of {list(SPLITS)} or empty (drawn)")
        if problems:
            bad.append(f"line {line}: " + "; ".join(problems))
        else:
            rows.append((rel, label, split))
    if bad:
        raise DataError(_listing(f"{len(bad)} bad row(s) in {labels}", bad))

    kept = Counter(label for _, label, _ in rows)
    found = set(kept) | (set(left_out) - {""})
    class_names = _class_names(params.classes, found, f"{labels}: needs at least 2 labels")
    for name in class_names:
        if not kept[name] and left_out[name]:
            raise DataError(
                f"{labels}: every one of the {left_out[name]} row(s) of class {name!r} is left "
                f"out by {_patterns(params)}."
            )
        if not kept[name]:
            raise DataError(
                f"prepare.classes lists {name!r} but no row of {labels} has that label; "
                f"found {sorted(kept)}."
            )
    others = sorted(set(kept) - set(class_names))
    if others:
        warnings.warn(
            f"{labels}: {sum(kept[o] for o in others)} row(s) with labels {others} left out: "
            f"not in prepare.classes {list(class_names)}.",
            stacklevel=3,
        )
    index = {name: i for i, name in enumerate(class_names)}
    entries = [_Entry(rel, index[lab], "", split) for rel, lab, split in rows if lab in index]
    return root, class_names, entries


# --- building the manifest --------------------------------------------------------------------


_STRATIFIED_BY = {"elpv": ("class", "cell_type"), "folder": ("class",), "csv": ("class",)}


def build_manifest(
    params: PrepareParams,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> PreparedManifest:
    """Check every image, collapse duplicates, group near-duplicates, draw the splits.

    Every file is read and decoded once (JPEGs at reduced DCT scale), which also gives its
    perceptual hash; ``progress`` wraps the iterable of that pass (e.g. tqdm). Raises
    DataError listing every bad image (mode "error"), each cross-class duplicate, and any
    class too small for the splits. Near-duplicate groups (hashes within
    prepare.near_duplicate_bits) each go to one split; a warning lists those that span
    classes or splits given by a labels file. Rows are sorted by path, so the csv does not
    reorder when only the seed changes.
    """
    if params.source == "elpv":
        root, class_names, entries = _elpv_entries(params.elpv_classes)
    elif params.source == "folder":
        root, class_names, entries = _folder_entries(params)
    else:
        root, class_names, entries = _csv_entries(params)
    entries.sort(key=lambda e: e.path)

    hashing = params.near_duplicate_bits is not None
    checked, bad = [], []  # checked: (sha256 or None, perceptual hash) per entry
    for entry in progress(entries) if progress else entries:
        try:
            data = (root / entry.path).read_bytes()
            # the smallest JPEG scale that still gives the hash its thumbnail; a full read
            image = _decode(data, entry.path, HASH_INPUT, params.max_pixels, keep_gray=True)
            phash = perceptual_hash(image) if hashing else 0
            checked.append((hashlib.sha256(data).hexdigest(), phash))
        except (OSError, DataError) as exc:
            reason = str(exc).removeprefix(f"{entry.path}: ")
            bad.append((entry.path, reason))
            checked.append((None, 0))
    if bad and params.on_bad_image == "error":
        raise DataError(
            _listing(f"{len(bad)} bad image(s) under {root}", [f"{p}: {r}" for p, r in bad])
            + "\nFix or remove them, or set prepare.on_bad_image: skip."
        )

    kept, phashes, duplicates, clashes, first = [], [], [], [], {}
    for entry, (sha, phash) in zip(entries, checked, strict=True):
        if sha is None:
            continue
        if sha not in first:
            first[sha] = entry
            kept.append((entry, sha))
            phashes.append(phash)
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

    entries = [e for e, _ in kept]
    groups = []
    if hashing:
        pairs = near_duplicate_pairs(np.array(phashes, dtype=np.uint64), params.near_duplicate_bits)
        groups = groups_of(len(entries), pairs)
    splits = _assign_splits(entries, groups, class_names, params)
    _warn_near_duplicates(entries, splits, groups, class_names, params)
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
        near_duplicates=tuple(tuple(entries[i].path for i in g) for g in groups),
        stratified_by=_STRATIFIED_BY[params.source],
    )


def _warn_near_duplicates(
    entries: list[_Entry],
    splits: list[str],
    groups: list[list[int]],
    class_names: tuple[str, ...],
    params: PrepareParams,
) -> None:
    """Warn about near-duplicate groups whose members carry different labels, or that the
    splits given by a labels file leave in more than one split.

    Not errors, unlike identical files in two classes: a perceptual match is evidence, not
    proof (ELPV's sister cells cut from one ingot look alike and some of them are defective).
    """

    def describe(group: list[int]) -> str:
        return ", ".join(
            f"{entries[i].path} ({class_names[entries[i].label]}, {splits[i]})" for i in group
        )

    bits = params.near_duplicate_bits
    mixed = [describe(g) for g in groups if len({entries[i].label for i in g}) > 1]
    if mixed:
        warnings.warn(
            _listing(
                f"{len(mixed)} near-duplicate group(s) (pHash within {bits} bits) span "
                "classes; check their labels",
                mixed,
            ),
            stacklevel=3,
        )
    leaks = [describe(g) for g in groups if len({splits[i] for i in g}) > 1]
    if leaks:
        warnings.warn(
            _listing(
                f"{len(leaks)} near-duplicate group(s) (pHash within {bits} bits) straddle "
                f"splits: the splits given in {params.labels} are kept (and take no drawn "
                "rows), so these leak; fix their split column to keep each group together",
                leaks,
            ),
            stacklevel=3,
        )


def _assign_splits(
    entries: list[_Entry],
    groups: list[list[int]],
    class_names: tuple[str, ...],
    params: PrepareParams,
) -> list[str]:
    """One split name per entry: given splits as given, the others drawn, stratified by class
    (x cell type) and seeded, with each near-duplicate group moving as one unit.

    Test is drawn from the undecided images (test_fraction) unless some entry is given
    "test"; val likewise from what trains (val_fraction of the undecided rest and the given
    "train" entries) unless some entry is given "val"; the rest is train. So a fixed test
    set stays exactly as given, and a group whose members are given different splits is cut
    along them (`_units`).
    """
    t, v = params.test_fraction, params.val_fraction
    units = _units(entries, groups)
    # what each unit holds of each stratum: a group may span classes
    holds = [Counter(f"{entries[i].label}|{entries[i].group}" for i in u) for u in units]
    split = [next((entries[i].split for i in u if entries[i].split), "") for u in units]
    fixed = set(split)
    draws = [("test", t, "", "val + train")] if "test" not in fixed else []
    if "val" not in fixed:
        draws.append(("val", v, "train", "train"))

    drawn_from = {"", *(also for _, _, also, _ in draws)}  # "train" when val is drawn
    counts = sum((h for h, s in zip(holds, split, strict=True) if s in drawn_from), Counter())
    if draws:
        _check_sizes(counts, [d[0] for d in draws], {e.label for e in entries}, class_names, params)

    rng = np.random.default_rng(params.seed)
    for name, fraction, also, rest in draws:
        pool = [u for u, s in enumerate(split) if s in ("", also)]
        chosen = set(_draw(pool, fraction, holds, rng))
        for u in chosen:
            split[u] = name
        for part, members in ((name, chosen), (rest, set(pool) - chosen)):
            missing = sorted(
                {s for u in pool for s in holds[u]} - {s for u in members for s in holds[u]}
            )
            if missing:
                largest = max((len(g) for g in groups), default=0)
                raise DataError(
                    f"The stratified split left no {part} image for "
                    + ", ".join(f"{_stratum(s, class_names)} ({counts[s]} images)" for s in missing)
                    + "; add images or raise the fractions"
                    + (
                        f" (near-duplicate groups move whole, the largest has {largest} images)."
                        if largest
                        else "."
                    )
                )
    out = [""] * len(entries)
    for unit, s in zip(units, split, strict=True):
        for i in unit:
            out[i] = s or "train"
    # Drawn splits always reach every split and class; given ones are checked here.
    trained = {e.label for e, s in zip(entries, out, strict=True) if s == "train"}
    gaps = [f"no {s} image" for s in SPLITS if s not in out]
    gaps += [
        f"no train image of class {n!r}" for i, n in enumerate(class_names) if i not in trained
    ]
    if gaps:
        raise DataError(
            f"The splits given in {params.labels} leave {'; '.join(gaps)}: give some rows that "
            "split, or leave their split empty to have it drawn."
        )
    return out


def _stratum(key: str, class_names: tuple[str, ...]) -> str:
    label, group = key.split("|")
    name = class_names[int(label)]
    return f"class {name!r} ({group} cells)" if group else f"class {name!r}"


def _check_sizes(
    counts: Counter,
    drawn: list[str],
    present: set[int],
    class_names: tuple[str, ...],
    params: PrepareParams,
) -> None:
    """Every stratum drawn from (``counts``: its images) must be big enough to reach each
    split it is drawn into (``drawn``: "test" and / or "val") and train, and no class empty."""
    t, v = params.test_fraction, params.val_fraction
    if drawn == ["test", "val"]:
        share = min(t, (1 - t) * v, (1 - t) * (1 - v))
    else:
        share = min(t, 1 - t) if drawn == ["test"] else min(v, 1 - v)
    needed = math.ceil(1 / share - 1e-9)
    small = [s for s in sorted(counts) if counts[s] < needed]
    small += [f"{i}|" for i in range(len(class_names)) if i not in present]
    if small:
        parts = ["train", *reversed(drawn)]
        raise DataError(
            "Too few images to stratify: "
            + "; ".join(f"{_stratum(s, class_names)} has {counts[s]}" for s in small)
            + f". With test_fraction={t} and val_fraction={v} each needs at least {needed} "
            f"so that {', '.join(parts[:-1])} and {parts[-1]} all get one; add images or "
            "raise the fractions."
        )


def _units(entries: list[_Entry], groups: list[list[int]]) -> list[list[int]]:
    """What moves between splits as one: every entry alone, except that each near-duplicate
    group is one unit per split given among its members, its undecided members joining its
    given train rows (if any) or forming a unit of their own."""
    units, grouped = [], set()
    for group in groups:
        parts: dict[str, list[int]] = {}
        for i in group:
            parts.setdefault(entries[i].split, []).append(i)
        if "" in parts and "train" in parts:  # given test and val take no other rows
            parts["train"] += parts.pop("")
        units += [sorted(members) for members in parts.values()]
        grouped.update(group)
    units += [[i] for i in range(len(entries)) if i not in grouped]
    return sorted(units)


def _draw(pool: list[int], fraction: float, holds: list[Counter], rng) -> list[int]:
    """Units of ``pool`` holding ceil(fraction x its images) images, stratified: each stratum
    gets its share (largest remainders), filled by walking the units in a seeded random order
    and taking each that still fits every stratum's room, so a group never overshoots and
    single images top up exactly."""
    counts = sum((holds[u] for u in pool), Counter())
    if not counts:
        return []
    names = sorted(counts)
    sizes = np.array([counts[n] for n in names], dtype=np.int64)
    target = math.ceil(fraction * sizes.sum() - 1e-9)  # scikit-learn's rounding of a share
    exact = sizes * target / sizes.sum()
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(quota - exact, kind="stable")[: target - quota.sum()]] += 1
    room = dict(zip(names, quota.tolist(), strict=True))
    chosen = []
    for u in rng.permutation(pool).tolist():
        if all(room[s] >= k for s, k in holds[u].items()):
            chosen.append(u)
            room.update({s: room[s] - k for s, k in holds[u].items()})
    return chosen


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
        "root": _root_as_given(params),
        "class_names": list(prepared.class_names),
        "n_samples": len(prepared.rows),
        "counts": prepared.counts(),
        "stratified_by": list(prepared.stratified_by),
        "skipped": len(prepared.skipped),
        "duplicates_collapsed": len(prepared.duplicates),
        "near_duplicate_groups": [list(g) for g in prepared.near_duplicates],
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


def _root_as_given(params: PrepareParams) -> str | None:
    """The image root as params give it (relative stays relative: no machine's path in the
    cache); None for the ELPV package, which is found where it is installed."""
    if params.source == "folder":
        return params.root
    if params.source == "csv":
        return Path(params.labels).parent.as_posix()
    return None


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
