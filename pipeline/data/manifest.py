"""The manifest (cache/manifest.csv + manifest.json + skipped.csv): every image of a source
checked once, duplicates collapsed, near-duplicates grouped, splits drawn (`build_manifest`),
written atomically (`write_manifest`) and read back checked by later stages (`read_manifest`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.config import PrepareParams, asdict
from pipeline.data.dedupe import HASH_INPUT, groups_of, near_duplicate_pairs, perceptual_hash
from pipeline.data.images import decode_image, read_image_bytes
from pipeline.data.sources import Entry, elpv_root, entries_of, listing
from pipeline.data.splits import SPLITS, assign_splits
from pipeline.errors import ConfigError, DataError
from pipeline.storage.atomic import atomic_file

COLUMNS = ("sample_id", "path", "label", "label_name", "split")
_STRATIFIED_BY = {"elpv": ("class", "cell_type"), "folder": ("class",), "csv": ("class",)}


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
    max_pixels: int  # prepare.max_pixels, which checked these images: decoding them again obeys it

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


# --- building the manifest --------------------------------------------------------------------


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
    root, class_names, entries = entries_of(params)
    checked, bad = _check_images(root, entries, params, progress)
    kept, phashes, duplicates = _collapse_duplicates(entries, checked, class_names)
    entries = [e for e, _ in kept]
    groups = []
    if params.near_duplicate_bits is not None:
        pairs = near_duplicate_pairs(np.array(phashes, dtype=np.uint64), params.near_duplicate_bits)
        groups = groups_of(len(entries), pairs)
    splits = assign_splits(entries, groups, class_names, params)
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


def _check_images(
    root: Path,
    entries: list[Entry],
    params: PrepareParams,
    progress: Callable[[Iterable], Iterable] | None,
) -> tuple[list[tuple[str | None, int]], list[tuple[str, str]]]:
    """(sha256 or None if bad, perceptual hash) per entry, and (path, reason) per bad image;
    DataError listing the bad images when prepare.on_bad_image is "error"."""
    hashing = params.near_duplicate_bits is not None
    checked, bad = [], []
    for entry in progress(entries) if progress else entries:
        try:
            data = read_image_bytes(root / entry.path)
            # the smallest JPEG scale that still gives the hash its thumbnail; a full read
            image = decode_image(
                data, entry.path, max_pixels=params.max_pixels, size=HASH_INPUT, keep_gray=True
            )
            phash = perceptual_hash(image) if hashing else 0
            checked.append((hashlib.sha256(data).hexdigest(), phash))
        except DataError as exc:
            reason = str(exc).removeprefix(f"{root / entry.path}: ")
            bad.append((entry.path, reason.removeprefix(f"{entry.path}: ")))
            checked.append((None, 0))
    if bad and params.on_bad_image == "error":
        raise DataError(
            listing(f"{len(bad)} bad image(s) under {root}", [f"{p}: {r}" for p, r in bad])
            + "\nFix or remove them, or set prepare.on_bad_image: skip."
        )
    return checked, bad


def _collapse_duplicates(
    entries: list[Entry], checked: list[tuple[str | None, int]], class_names: tuple[str, ...]
) -> tuple[list[tuple[Entry, str]], list[int], list[tuple[str, str]]]:
    """The first of each set of identical files as (entry, sha256), their perceptual hashes,
    and (kept, dropped) path pairs; DataError for identical files in different classes."""
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
            listing(f"{len(clashes)} identical file(s) labelled with different classes", clashes)
        )
    if duplicates:
        warnings.warn(
            listing(
                f"{len(duplicates)} duplicate image(s) collapsed within their class "
                "(kept = dropped)",
                [f"{a} = {b}" for a, b in duplicates],
            ),
            stacklevel=3,
        )
    return kept, phashes, duplicates


def _warn_near_duplicates(
    entries: list[Entry],
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
            listing(
                f"{len(mixed)} near-duplicate group(s) (pHash within {bits} bits) span "
                "classes; check their labels",
                mixed,
            ),
            stacklevel=3,
        )
    leaks = [describe(g) for g in groups if len({splits[i] for i in g}) > 1]
    if leaks:
        warnings.warn(
            listing(
                f"{len(leaks)} near-duplicate group(s) (pHash within {bits} bits) straddle "
                f"splits: the splits given in {params.labels} are kept (and take no drawn "
                "rows), so these leak; fix their split column to keep each group together",
                leaks,
            ),
            stacklevel=3,
        )


# --- files ------------------------------------------------------------------------------------


def manifest_json_path(csv_path: Path | str) -> Path:
    return Path(csv_path).with_suffix(".json")


def skipped_path(csv_path: Path | str) -> Path:
    return Path(csv_path).with_name("skipped.csv")


def manifest_files(csv_path: Path | str) -> tuple[Path, Path, Path]:
    """(csv, json, skipped): the files `write_manifest` writes for ``csv_path``."""
    return Path(csv_path), manifest_json_path(csv_path), skipped_path(csv_path)


def write_manifest(csv_path: Path | str, prepared: PreparedManifest) -> tuple[Path, Path, Path]:
    """Write the csv, its json sidecar and skipped.csv (always, possibly header-only).

    Identical inputs give identical bytes ("\\n" line endings, no timestamps). Each file is
    written to a temporary file in the same folder; all are renamed into place once all
    are written.
    Returns (csv, json, skipped) paths.
    """
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
    texts = (
        _csv_text(COLUMNS, prepared.rows),
        json.dumps(meta, indent=2) + "\n",
        _csv_text(("path", "reason"), prepared.skipped),
    )
    files = manifest_files(csv_path)
    with contextlib.ExitStack() as stack:  # every file written before any is renamed
        for target, text in zip(files, texts, strict=True):
            tmp = stack.enter_context(atomic_file(target))
            tmp.write_text(text, encoding="utf-8", newline="")
    return files


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
    class_names, root, max_pixels = _read_meta(json_path, meta)
    sample_id, rel_path, label, split = _read_rows(csv_path, raw, class_names, json_path.name)
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
        max_pixels=max_pixels,
    )


def _read_meta(json_path: Path, meta: dict) -> tuple[tuple[str, ...], Path, int]:
    """(class names, resolved image root, prepare.max_pixels) from manifest.json."""
    class_names = tuple(meta.get("class_names") or ())
    if len(class_names) < 2:
        raise DataError(f"{json_path}: 'class_names' must list at least 2 classes.")
    if meta.get("source") == "elpv":
        root = elpv_root()
    elif meta.get("root"):
        root = Path(meta["root"]).resolve()
    else:
        raise DataError(f"{json_path}: source {meta.get('source')!r} without a 'root'.")
    max_pixels = (meta.get("params") or {}).get("max_pixels")
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise DataError(
            f"{json_path}: params.max_pixels must be an int >= 1, got {max_pixels!r}; "
            "run `defuse prepare` again."
        )
    return class_names, root, max_pixels


def _read_rows(
    csv_path: Path, raw: bytes, class_names: tuple[str, ...], json_name: str
) -> tuple[list[str], list[str], list[int], list[str]]:
    """The checked columns (sample_id, path, label, split) of the manifest csv bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not UTF-8 text: {exc}") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = tuple(next(reader, ()))
    if header != COLUMNS:
        raise DataError(f"{csv_path}: columns must be {list(COLUMNS)}; got {list(header)}.")
    columns, seen = ([], [], [], []), ({}, {})
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
                f"{list(class_names)} in {json_name}."
            )
        if len(sid) != 64 or sid.strip("0123456789abcdef"):
            raise DataError(f"{where}: sample_id {sid!r} is not a sha256 hex digest.")
        if sp not in SPLITS:
            raise DataError(f"{where}: split {sp!r} is not one of {list(SPLITS)}.")
        for value, first, what in ((sid, seen[0], "sample_id"), (path, seen[1], "path")):
            if value in first:
                raise DataError(f"{where}: {what} {value!r} repeats row {first[value]}.")
            first[value] = line
        for column, value in zip(columns, (sid, path, lab, sp), strict=True):
            column.append(value)
    if not columns[0]:
        raise DataError(f"{csv_path}: the manifest has no rows.")
    return columns
