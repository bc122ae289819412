"""Where the images come from: the ELPV package, an image folder (one sub-folder per class)
or a labels file (csv). Each gives the image root, the class names and one `Entry` per file;
nothing is decoded here."""

from __future__ import annotations

import csv
import importlib.resources
import io
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from pipeline.config import PrepareParams
from pipeline.data.images import regular_file_problem, walk_files
from pipeline.data.splits import SPLITS
from pipeline.errors import DataError

# ELPV defect probability 0, 1/3, 2/3, 1 (four classes) or p < 0.5 vs p >= 0.5 (two).
ELPV_CLASSES = {
    4: ("functional", "possibly_defective", "likely_defective", "defective"),
    2: ("functional", "defective"),
}
_MAX_LISTED = 20  # problems listed in one error message before "and N more"


class Entry(NamedTuple):
    path: str  # relative to the root, forward slashes
    label: int
    group: str  # extra stratification key ("" for folders; cell type for ELPV)
    split: str  # given by a labels file; "" = drawn by `build_manifest`


def entries_of(params: PrepareParams) -> tuple[Path, tuple[str, ...], list[Entry]]:
    """(resolved image root, class names in label order, entries sorted by path)."""
    if params.source == "elpv":
        root, class_names, entries = _elpv_entries(params.elpv_classes)
    elif params.source == "folder":
        root, class_names, entries = _folder_entries(params)
    else:
        root, class_names, entries = _csv_entries(params)
    return root, class_names, sorted(entries, key=lambda e: e.path)


def listing(title: str, lines: list[str]) -> str:
    """``title`` and the first lines of ``lines``, one a line, for one error message."""
    shown = lines[:_MAX_LISTED]
    more = len(lines) - len(shown)
    return f"{title}:\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")


# --- ELPV ---------------------------------------------------------------------------------------


def elpv_root() -> Path:
    """The elpv-dataset package's data folder (labels.csv + images/)."""
    try:
        return Path(str(importlib.resources.files("elpv_dataset") / "data")).resolve()
    except ModuleNotFoundError as exc:
        raise DataError(
            "prepare.source 'elpv' needs the elpv-dataset package: pip install elpv-dataset."
        ) from exc


def _elpv_entries(n_classes: int) -> tuple[Path, tuple[str, ...], list[Entry]]:
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
        entries.append(Entry(rel, label, cell_type, ""))
    return root, ELPV_CLASSES[n_classes], entries


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return -1.0  # fails the 0, 1/3, 2/3, 1 check, which names the line


# --- image folder -------------------------------------------------------------------------------


def _folder_entries(params: PrepareParams) -> tuple[Path, tuple[str, ...], list[Entry]]:
    """root/<class>/**/<file>; hidden files and folders are ignored, every other file that
    passes prepare.include / exclude (matched within its class folder) counts."""
    root = Path(params.root).resolve()
    if not root.is_dir():
        raise DataError(f"prepare.root {params.root!r}: no such folder ({root}).")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    missing = [c for c in params.classes or () if c not in found]
    if missing:
        raise DataError(
            f"prepare.classes lists {missing} but {root} has no such sub-folder(s); found {found}."
        )
    class_names = _class_names(
        params.classes, found, f"{root}: needs at least 2 class sub-folders (root/<class>/<image>)"
    )
    entries = []
    for label, name in enumerate(class_names):
        folder = root / name
        files = [p.relative_to(folder).as_posix() for p in walk_files(folder)]
        if not files:
            raise DataError(f"{folder}: class folder {name!r} holds no files.")
        chosen = [f for f in files if _selected(f, params)]
        if not chosen:
            raise DataError(
                f"{folder}: none of the {len(files)} file(s) of class folder {name!r} passes "
                f"{_patterns(params)}."
            )
        entries += [Entry(f"{name}/{f}", label, "", "") for f in chosen]
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


# --- labels file --------------------------------------------------------------------------------


def _csv_entries(params: PrepareParams) -> tuple[Path, tuple[str, ...], list[Entry]]:
    """The labels file: a header naming `path` and `label`, optionally `split` (any order).

    Image paths are relative to the labels file's folder and stay inside it. Every bad row
    (missing or not regular file, empty label, unknown split, repeated path, wrong field
    count) is listed at once with its line number; rows that prepare.include / exclude leave
    out are checked for their path only. With prepare.classes, rows of other labels are left
    out (a warning counts them).
    """
    labels = Path(params.labels)
    root = labels.parent.resolve()
    reader = csv.reader(io.StringIO(_labels_text(params), newline=""))
    header = _labels_header(labels, reader)
    rows, left_out = _labels_rows(labels, root, header, reader, params)
    class_names = _labels_classes(labels, Counter(r[1] for r in rows), left_out, params)
    index = {name: i for i, name in enumerate(class_names)}
    entries = [Entry(rel, index[lab], "", split) for rel, lab, split in rows if lab in index]
    return root, class_names, entries


def _labels_text(params: PrepareParams) -> str:
    labels = Path(params.labels)
    problem = regular_file_problem(labels)  # never open a FIFO or a device
    try:
        if problem is None:
            return labels.read_text(encoding="utf-8-sig")  # Excel writes a byte-order mark
    except OSError as exc:
        problem = exc.strerror or str(exc)
    except UnicodeDecodeError as exc:
        raise DataError(f"{labels}: not UTF-8 text: {exc}") from exc
    raise DataError(f"prepare.labels {params.labels!r}: cannot read the labels file: {problem}.")


def _labels_header(labels: Path, reader) -> list[str]:
    header = [h.strip() for h in _next_record(labels, reader) or []]
    if sorted(header) not in (["label", "path"], ["label", "path", "split"]):
        raise DataError(
            f"{labels}, line 1: the header must name the columns path and label, and "
            f"optionally split; got {header}."
        )
    return header


def _next_record(labels: Path, reader) -> list[str] | None:
    """The next csv record; DataError naming the line for a field over csv's size limit."""
    try:
        return next(reader, None)
    except csv.Error as exc:  # e.g. "field larger than field limit (131072)"
        raise DataError(f"{labels}, line {reader.line_num}: not a labels row: {exc}.") from exc


def _labels_rows(
    labels: Path, root: Path, header: list[str], reader, params: PrepareParams
) -> tuple[list[tuple[str, str, str]], Counter]:
    """(path, label, split) of each selected good row, and per label the rows left out by
    prepare.include / exclude; DataError listing every bad row."""
    rows, bad, seen, left_out = [], [], {}, Counter()
    while (record := _next_record(labels, reader)) is not None:
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
        problems = _row_problems(root, given, rel, label, split)
        if problems:
            bad.append(f"line {line}: " + "; ".join(problems))
        else:
            rows.append((rel, label, split))
    if bad:
        raise DataError(listing(f"{len(bad)} bad row(s) in {labels}", bad))
    return rows, left_out


def _row_problems(root: Path, given: str, rel: str, label: str, split: str) -> list[str]:
    problem = regular_file_problem(root / rel)
    problems = [f"{given}: {problem}"] if problem else []
    if not label:
        problems.append("empty label")
    if split not in ("", *SPLITS):
        problems.append(f"split {split!r} is not one of {list(SPLITS)} or empty (drawn)")
    return problems


def _labels_classes(
    labels: Path, kept: Counter, left_out: Counter, params: PrepareParams
) -> tuple[str, ...]:
    """The class names (prepare.classes, else every label seen); each must keep a row."""
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
            stacklevel=5,
        )
    return class_names
