"""Artifacts appear whole or not at all, with umask modes; killed runs' leftovers are removed."""

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.storage.atomic import (
    atomic_dir,
    atomic_file,
    clean_stale,
    os_error_message,
    temp_path,
    write_text,
)

REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def test_a_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("boom")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "1", "b": "1"}
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert [p.name for p in target.iterdir()] == ["c"]  # nothing of the old folder is kept
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary sibling left


def test_a_file_is_replaced_only_when_complete(tmp_path):
    target = write_text(tmp_path / "m.json", "old\n")
    with pytest.raises(ValueError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise ValueError
    assert target.read_text() == "old\n"
    assert write_text(target, "a\r\nb").read_bytes() == b"a\r\nb"  # line endings as given
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755),
                                                              (0o027, 0o640, 0o750)])  # fmt: skip
def test_modes_follow_the_umask_whatever_created_the_files(tmp_path, umask, mask, file_mode,
                                                           dir_mode):  # fmt: skip
    umask(mask)
    with atomic_dir(tmp_path / "ckpt") as tmp:
        fd = os.open(tmp / "private", os.O_CREAT | os.O_WRONLY, 0o600)  # as mkstemp makes it
        os.close(fd)
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "x").write_text("x")
    assert _mode(tmp_path / "ckpt") == dir_mode and _mode(tmp_path / "ckpt" / "sub") == dir_mode
    assert _mode(tmp_path / "ckpt" / "private") == file_mode
    assert _mode(tmp_path / "ckpt" / "sub" / "x") == file_mode
    with atomic_file(tmp_path / "f.json") as tmp:
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    assert _mode(tmp_path / "f.json") == file_mode


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = _dead_pid()
    target = tmp_path / "f.h5"
    stale = [tmp_path / f".f.h5.tmp-{dead}-0a1b", tmp_path / f".f.h5.tmp-{dead}"]
    (tmp_path / f".f.h5.old-{dead}-ff").mkdir()
    stale.append(tmp_path / f".f.h5.old-{dead}-ff")
    for path in stale[:2]:
        path.write_text("half")
    live = temp_path(target)  # this process's: still being written
    live.write_text("in progress")
    other = tmp_path / f".g.h5.tmp-{dead}-00"  # another artifact's: not this writer's business
    other.write_text("x")
    write_text(target, "done")
    assert sorted(tmp_path.iterdir()) == sorted([target, live, other])
    assert clean_stale(tmp_path / "g.h5") == [other]


def test_a_killed_writer_leaves_the_old_folder_and_the_next_run_tidies_up(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("old")
    code = (
        "import os, sys; from pipeline.storage.atomic import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'weights').write_text('new, half written')\n"
        "    os._exit(9)  # killed mid-write: no cleanup runs\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code, str(target)], env=env)
    assert run.returncode == 9
    assert (target / "weights").read_text() == "old"
    assert len(list(tmp_path.iterdir())) == 2  # the killed run's temporary folder
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("next")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (target / "weights").read_text() == "next"


def _full_disk(src, dst):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src), None, str(dst))


def test_a_failed_commit_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = write_text(tmp_path / "m.csv", "old")
    monkeypatch.setattr(os, "replace", _full_disk)
    with pytest.raises(OSError) as caught:
        write_text(target, "new")
    assert os_error_message(caught.value) == f"{target}: No space left on device [ENOSPC]."
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.csv"]


def test_a_folder_whose_second_rename_fails_is_put_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            _full_disk(src, dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
    assert (target / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_an_error_that_names_no_file_is_told_as_the_artifact(tmp_path):
    target = tmp_path / "cache.h5"
    with pytest.raises(OSError) as caught, atomic_file(target):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))  # h5py names no file
    assert os_error_message(caught.value) == f"{target}: Read-only file system [EROFS]."
    inside = temp_path(tmp_path / "head") / "head.json"  # a file in a folder being written
    error = OSError(errno.EACCES, os.strerror(errno.EACCES), str(inside))
    assert (
        os_error_message(error) == f"{tmp_path / 'head' / 'head.json'}: Permission denied [EACCES]."
    )
    assert not target.exists() and list(tmp_path.iterdir()) == []
