"""The row store under both caches: forged shapes, data kept outside the file, files that are
not regular, tampered values and failed writes, on real HDF5 files in tmp_path."""

import os
import resource

import h5py
import numpy as np
import pytest
from conftest import feature_attrs

from pipeline.errors import CacheError
from pipeline.storage.feature_cache import (
    CacheWriter,
    cache_info,
    read_cache,
    reusable_cache,
    verify_cache,
)
from pipeline.storage.fused import load_features
from pipeline.storage.image_cache import read_image_cache, verify_image_cache
from pipeline.storage.rowstore import rows_for

N, D = 6, 4
IDS = [f"{i:064x}" for i in range(N)]


def _cache(path):
    with CacheWriter(path, N, D, feature_attrs()) as w:
        w.write(0, np.arange(N * D).reshape(N, D) / 7, np.ones((N, 3)), IDS, np.arange(N) % 3,
                np.arange(N) % 3)  # fmt: skip
    return path


def _readers():
    return {
        "read_cache": read_cache,
        "verify_cache": lambda p: _raise(verify_cache(p)),
        "cache_info": cache_info,
        "load_features": lambda p: load_features([p]),
        "read_image_cache": read_image_cache,
        "verify_image_cache": lambda p: _raise(verify_image_cache(p)),
    }


def _raise(problems):
    if problems:
        raise CacheError(problems[0])


def _forge(path, tmp_path, make):
    """A copy of a sound cache whose datasets are recreated by ``make(f, name, ds)``."""
    forged = tmp_path / "forged.h5"
    with h5py.File(path) as src, h5py.File(forged, "w") as f:
        for key, value in src.attrs.items():
            f.attrs[key] = value
        for name, ds in src.items():
            make(f, name, ds)
    return forged


def _each_refuses(path, says):
    for name, read in _readers().items():
        with pytest.raises(CacheError) as err:
            read(path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message, name
        if "image" not in name:  # an image reader may stop first at the missing image_schema
            assert says in message, (name, message)


def test_a_tiny_file_declaring_a_trillion_rows_is_refused_without_allocating(tmp_path):
    forged = _forge(
        _cache(tmp_path / "c.h5"),
        tmp_path,
        lambda f, name, ds: f.create_dataset(name, (10**12, *ds.shape[1:]), ds.dtype),
    )
    assert forged.stat().st_size < 10_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _each_refuses(forged, "declares shape (1000000000000, 4)")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_data_kept_outside_the_file_is_refused(tmp_path):
    elsewhere = tmp_path / "outside.bin"
    elsewhere.write_bytes(np.zeros(N * D, np.float32).tobytes())

    def external(f, name, ds):
        if name == "embeddings":
            f.create_dataset(name, ds.shape, ds.dtype, external=[(str(elsewhere), 0, N * D * 4)])
        else:
            f.create_dataset(name, data=ds[()])

    forged = _forge(_cache(tmp_path / "c.h5"), tmp_path, external)
    _each_refuses(forged, "dataset 'embeddings' keeps its values in other files")


def test_chunked_datasets_are_refused(tmp_path):
    forged = _forge(
        _cache(tmp_path / "c.h5"),
        tmp_path,
        lambda f, name, ds: f.create_dataset(name, data=ds[()], chunks=True, compression="gzip"),
    )
    _each_refuses(forged, "is chunked or compact")


def test_paths_that_are_not_regular_files_are_refused_before_opening(tmp_path):
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)  # opening it would block for ever
    zero = tmp_path / "zero.h5"
    zero.symlink_to("/dev/zero")  # endless bytes
    for path in (fifo, zero, tmp_path):
        _each_refuses(path, "not a regular file")
    assert reusable_cache(fifo, feature_attrs()) is None


def test_a_changed_embedding_is_refused_and_never_reused(tmp_path):
    path = _cache(tmp_path / "c.h5")
    assert reusable_cache(path, feature_attrs()) is not None
    with h5py.File(path, "r+") as f:
        f["embeddings"][2, 1] += 1.0  # finite: only the digest can tell
    says = f"{path}: dataset 'embeddings' does not match its stored sha256 digest"
    for read in (
        read_cache,
        lambda p: load_features([p]),
        lambda p: load_features([p], None, None, 0),
    ):
        with pytest.raises(CacheError, match=says):
            read(path)
    assert verify_cache(path)[0].startswith(says)
    assert reusable_cache(path, feature_attrs()) is None  # extract computes every row again


def test_swapped_sample_ids_are_refused(tmp_path):
    path = _cache(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f["sample_id"][0], f["sample_id"][1] = IDS[1], IDS[0]
    (problem,) = verify_cache(path)
    assert problem.startswith(f"{path}: dataset 'sample_id' does not match its stored sha256")


def _failing_close(f):
    real_close = f.close

    def close():
        real_close()
        raise OSError("No space left on device")

    f.close = close


@pytest.mark.parametrize("fails", ["while writing", "on the final close"])
def test_the_temporary_file_goes_even_when_closing_it_fails(tmp_path, fails):
    path = tmp_path / "c.h5"
    expected = RuntimeError if fails == "while writing" else OSError
    with pytest.raises(expected), CacheWriter(path, N, D, feature_attrs()) as w:
        _failing_close(w._rows._file)
        w.write(0, np.ones((N, D)), np.ones((N, 3)), IDS, np.zeros(N, int), np.zeros(N, int))
        if fails == "while writing":
            raise RuntimeError("the error the caller sees")
    assert list(tmp_path.iterdir()) == []


def test_rows_for_finds_each_id_or_minus_one():
    ids = np.array([b"b" * 64, b"a" * 64, b"c" * 64], "S64")
    np.testing.assert_array_equal(rows_for(ids, ["c" * 64, "x" * 64, "b" * 64]), [2, -1, 0])
    np.testing.assert_array_equal(rows_for(ids[:0], ["a" * 64]), [-1])
