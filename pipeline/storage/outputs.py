"""What a command may write where, checked before it does any work: a wrong `--out` is
refused with one line and nothing is touched.

    check_file_output(out, "--out")                    # a file: never a folder
    check_folder_output(reports, "--reports")          # a shared folder: never a file
    check_folder_output(out, "--out", artifact=HEAD)   # a folder the command replaces whole

A folder a command replaces whole (a checkpoint, a head, an export) must be new, empty, or
an earlier artifact of the same kind: its sidecar there and nothing it does not write. And
the nearest existing folder above every output must be one this process can write in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DefuseError

_LISTED = 5  # foreign entries named in a refusal


class OutputError(DefuseError):
    """An output path that the command must not (or cannot) write."""


@dataclass(frozen=True)
class ArtifactFolder:
    """A kind of folder artifact: ``sidecar`` marks one; ``entries`` is every name it holds."""

    kind: str  # "checkpoint", "head", "export": for messages
    sidecar: str  # e.g. "model.json"
    entries: frozenset[str]  # the sidecar included, e.g. {"model.json", "model.safetensors"}

    @classmethod
    def of(cls, kind: str, sidecar: str, *others: str) -> ArtifactFolder:
        return cls(kind, sidecar, frozenset((sidecar, *others)))


def check_file_output(path: Path | str, option: str) -> Path:
    """``path`` as a Path, unless it is a folder or its parent cannot be written: OutputError
    naming ``option`` (the command-line option, or params key, that gave it)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path}: a folder, not a file; name a file to write.")
    _check_parent(path, option)
    return path


def check_folder_output(
    path: Path | str, option: str, artifact: ArtifactFolder | None = None
) -> Path:
    """``path`` as a Path, unless it is a file, its parent cannot be written or, with
    ``artifact`` (the command replaces the folder whole), it holds anything but an earlier
    artifact of that kind: OutputError naming ``option`` and what is in the way."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path}: a file, not a folder; name a folder to write.")
    _check_parent(path, option)
    if artifact is not None and path.is_dir():
        _check_artifact(path, option, artifact)
    return path


def _check_artifact(path: Path, option: str, artifact: ArtifactFolder) -> None:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return
    foreign = [n for n in names if n not in artifact.entries]
    if artifact.sidecar in names and not foreign:
        return
    shown = foreign or names
    what = ", ".join(shown[:_LISTED]) + (
        f" and {len(shown) - _LISTED} more" if len(shown) > _LISTED else ""
    )
    raise OutputError(
        f"{option} {path}: holds {what}, not a {artifact.kind} (only "
        f"{', '.join(sorted(artifact.entries))}); the {artifact.kind} replaces the folder "
        f"whole: name a new or empty folder, or an earlier {artifact.kind}'s."
    )


def check_outputs(paths: Iterable[Path | str], option: str) -> list[Path]:
    """`check_file_output` for each of ``paths``, all given by ``option``."""
    return [check_file_output(p, option) for p in paths]


def _check_parent(path: Path, option: str) -> None:
    """The nearest existing folder above ``path`` must be a folder this process can write
    in (files are created there, or folders on the way to it)."""
    above = path.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise OutputError(f"{option} {path}: {above} is a file, not a folder.")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: cannot write in {above} (permission denied).")
