"""Artifacts that appear whole or not at all: written under a hidden temporary name beside
their place and renamed into it only when complete.

    with atomic_dir(out) as tmp:        # a folder: fill tmp, it then replaces out whole
        save_file(state, tmp / "model.safetensors")
    with atomic_file(path) as tmp:      # one file: write tmp, it then replaces path
        tmp.write_bytes(data)
    write_text(path, text)              # the same for a text file

Temporary names are `.<name>.tmp-<pid>-<random>` (and `.<name>.old-<pid>-<random>` for the
folder being replaced); each writer first removes those of ``path`` whose process has ended,
the leftovers of a killed run. What lands in place has the modes the umask gives new files,
0644 / 0755 under umask 022, whatever created it (mkstemp's 0600 included), so teammates on
a shared machine can read it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

# `.<name>.tmp-<pid>-<hex>`; without the hex: the `.<name>.tmp-<pid>` of earlier versions
_TEMP_SUFFIX = r"\.(?:tmp|old)-(\d+)(?:-[0-9a-f]+)?"
_TEMP_NAME = re.compile(rf"\.(.+){_TEMP_SUFFIX}")


def temp_path(path: Path | str, kind: str = "tmp") -> Path:
    """A fresh hidden name beside ``path`` that `clean_stale` recognises; nothing is created."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def clean_stale(path: Path | str) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by processes that no longer run (on
    this machine); those of running processes are left alone. Returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}{_TEMP_SUFFIX}")
    removed = []
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _running(int(match.group(1))):
            _remove(entry)
            removed.append(entry)
    return removed


def commit(tmp: Path | str, path: Path | str) -> None:
    """Put the complete file or folder ``tmp`` in the place of ``path``, with umask modes and
    flushed to disk. A folder replaces an existing ``path`` by two renames: the old one goes
    aside first, so a kill between them leaves no ``path`` (and the old one to clean), never
    a mixture; if the second rename fails, the old one is put back."""
    tmp, path = Path(tmp), Path(path)
    _settle(tmp)
    if not tmp.is_dir():
        os.replace(tmp, path)
    else:
        old = None
        if path.exists():
            old = temp_path(path, "old")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            _remove(old)
    _fsync(path.parent)  # the rename itself


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on a clean exit it replaces ``path``,
    on an exception it is removed and ``path`` stays as it was."""
    with _atomic(Path(path), folder=False) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_dir(directory: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``directory`` to fill; on a clean exit it
    replaces ``directory`` whole, on an exception it is removed and ``directory`` stays."""
    with _atomic(Path(directory), folder=True) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic(path: Path, folder: bool) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = temp_path(path)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        commit(tmp, path)
    except OSError as exc:
        _blame(exc, path)
        raise
    finally:
        _remove(tmp)


def write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8, line endings as given) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(path)


def os_error_message(exc: OSError) -> str:
    """One line for a failed read or write (disk full, permission denied, read-only file
    system, ...): the file by its final name (a temporary one is told as the artifact it
    was becoming), the reason, and the error code."""
    name = exc.filename2 if exc.filename2 is not None else exc.filename
    code = errno.errorcode.get(exc.errno, "")
    reason = (exc.strerror or str(exc)) + (f" [{code}]" if code else "")
    if name is None:
        return f"cannot read or write a file: {reason}."
    final = Path(*(_final_part(p) for p in Path(os.fsdecode(name)).parts))
    return f"{final}: {reason}."


def _final_part(part: str) -> str:
    match = _TEMP_NAME.fullmatch(part)
    return match.group(1) if match else part


def _blame(exc: OSError, path: Path) -> None:
    """An OSError raised while ``path`` was written that names no file is about ``path``
    (h5py's and some writers' errors name none)."""
    if exc.filename is None:
        exc.filename = str(path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (no window in which
    another thread would create files with a zero umask)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _settle(tmp: Path) -> None:
    """umask modes on ``tmp`` and everything under it, whose bytes are flushed to disk."""
    mask = _umask()
    paths = [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]
    for p in paths:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
        if p.is_file():
            _fsync(p)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
