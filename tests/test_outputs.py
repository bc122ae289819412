"""Output checks: a file output never replaces a folder, a folder output never a file, an
artifact folder only an earlier artifact of its kind; all before any work."""

import os

import pytest

from pipeline.storage.outputs import (
    ArtifactFolder,
    OutputError,
    check_file_output,
    check_folder_output,
)

HEAD = ArtifactFolder.of("head", "head.json", "head.safetensors")


def test_a_file_output_refuses_a_folder_and_a_file_in_its_path(tmp_path):
    (tmp_path / "reports").mkdir()
    with pytest.raises(OutputError, match=r"^--out .*reports: a folder, not a file"):
        check_file_output(tmp_path / "reports", "--out")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"notes\.txt is a file, not a folder"):
        check_file_output(tmp_path / "notes.txt" / "m.csv", "--out")
    assert check_file_output(tmp_path / "new" / "m.csv", "--out") == tmp_path / "new" / "m.csv"


def test_a_folder_output_refuses_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"notes\.txt: a file, not a folder"):
        check_folder_output(tmp_path / "notes.txt", "--reports")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_artifact_folder_takes_only_an_earlier_artifact_of_its_kind(tmp_path):
    for name in ("logreg", "mlp"):
        (tmp_path / "heads" / name).mkdir(parents=True)
        (tmp_path / "heads" / name / "head.json").write_text("{}")
        (tmp_path / "heads" / name / "head.safetensors").write_bytes(b"")
    check_folder_output(tmp_path / "heads" / "logreg", "--out", HEAD)  # an earlier head
    check_folder_output(tmp_path / "heads" / "new", "--out", HEAD)  # not there yet
    (tmp_path / "empty").mkdir()
    check_folder_output(tmp_path / "empty", "--out", HEAD)
    with pytest.raises(
        OutputError, match=r"heads: holds logreg, mlp, not a head \(only head\.json"
    ):
        check_folder_output(tmp_path / "heads", "--out", HEAD)
    (tmp_path / "heads" / "mlp" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"mlp: holds notes\.txt, not a head"):
        check_folder_output(tmp_path / "heads" / "mlp", "--out", HEAD)
    (tmp_path / "heads" / "logreg" / "head.json").unlink()
    with pytest.raises(OutputError, match=r"logreg: holds head\.safetensors, not a head"):
        check_folder_output(tmp_path / "heads" / "logreg", "--out", HEAD)


def test_an_output_where_nothing_can_be_written_is_refused(tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != tmp_path and real(p, mode))
    with pytest.raises(OutputError, match=r"cannot write in .* \(permission denied\)"):
        check_file_output(tmp_path / "a" / "m.csv", "--out")
    with pytest.raises(OutputError, match=r"cannot write in"):
        check_folder_output(tmp_path / "reports", "--reports")


def test_a_read_only_folder_is_refused_up_front(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("chmod does not restrict this user (root): see the monkeypatched test")
        with pytest.raises(OutputError, match=r"cannot write in .*ro"):
            check_file_output(tmp_path / "ro" / "m.csv", "--out")
    finally:
        (tmp_path / "ro").chmod(0o755)
