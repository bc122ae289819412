"""Feature cache format: real HDF5 files in tmp_path, written, damaged and read back."""

import contextlib
import hashlib
import os
import stat
import time
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from conftest import killed_cache_writer, rewrite_digests

from pipeline.errors import CacheError
from pipeline.models.preprocessing import Preprocessing
from pipeline.storage.feature_cache import (
    ATTRS,
    FEATURES,
    SPLITS,
    CacheWriter,
    cache_attrs,
    cache_info,
    read_cache,
    reusable_cache,
    verify_cache,
)
from pipeline.storage.fused import LazyRows, load_features
from pipeline.storage.hashing import file_sha256

N, D, C = 50, 16, 3
MANIFEST_SHA = "a" * 64
PREP = Preprocessing(224, "stretch", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")

# the attributes a torch cache writes: one at its default (engine "torch") is left out
WRITTEN = [k for k in ATTRS if k not in FEATURES.defaults]


def _data(seed=0, n=N, dim=D):
    rng = np.random.default_rng(seed)
    ids = np.array([hashlib.sha256(f"img{i}".encode()).hexdigest() for i in range(n)])
    return dict(
        embeddings=rng.standard_normal((n, dim)).astype(np.float32),
        logits=rng.standard_normal((n, C)).astype(np.float32),
        sample_id=ids,
        label=np.arange(n) % C,
        split=np.array(SPLITS)[np.arange(n) % 3],
    )


def _attrs(backbone="lite0", dtype="float32", **over):
    versions = {"defuse": "0.1.0", "torch": "2.5", "timm": "1.0", "h5py": "3.16", "numpy": "2"}
    attrs = cache_attrs(backbone, ["ok", "crack", "finger"], PREP, "c" * 64, MANIFEST_SHA,
                        dtype=dtype, versions=versions)  # fmt: skip
    return attrs | over


def _write(path, data, order=None, batch=16, **attrs):
    order = np.arange(len(data["sample_id"])) if order is None else order
    n, dim = data["embeddings"].shape
    with CacheWriter(path, n, dim, _attrs(**attrs)) as w:
        for s in range(0, n, batch):
            rows = order[s : s + batch]
            w.write(s, *(data[k][rows] for k in ("embeddings", "logits", "sample_id", "label")),
                    data["split"][rows])  # fmt: skip
    return path


def _manifest(data, sha=MANIFEST_SHA):
    return SimpleNamespace(sample_id=list(data["sample_id"]), label=data["label"],
                           split=list(data["split"]), sha256=sha)  # fmt: skip


@pytest.fixture
def good(tmp_path):
    data = _data()
    return _write(tmp_path / "lite0.h5", data), data


def _edit(path, fn, digests=True):
    """Change the file with ``fn``; ``digests``: store the digests of the changed content
    too, so that the checks behind the digest check are reached."""
    with h5py.File(path, "r+") as f:
        fn(f)
        if digests:
            rewrite_digests(f)


def test_round_trip_keeps_values_attrs_and_their_order(good):
    path, data = good
    cache = read_cache(path)
    np.testing.assert_array_equal(cache.embeddings, data["embeddings"])
    np.testing.assert_array_equal(cache.logits, data["logits"])
    np.testing.assert_array_equal(cache.sample_id, data["sample_id"])
    np.testing.assert_array_equal(cache.label, data["label"])
    np.testing.assert_array_equal(cache.split, data["split"])
    assert cache.label.dtype == np.int64
    assert cache.attrs["class_names"] == ["ok", "crack", "finger"]
    assert cache.attrs["versions"]["h5py"] == "3.16"
    assert Preprocessing.from_json(cache.attrs["preprocessing"]) == PREP
    assert cache.attrs["tta"] is False
    assert (cache.attrs["schema"], cache.attrs["dim"], cache.attrs["n_classes"]) == (2, D, C)
    assert set(cache.attrs["digests"]) == {"embeddings", "logits", "sample_id", "label", "split",
                                           "fold"}  # fmt: skip
    with h5py.File(path) as f:
        assert list(f.attrs) == ["schema", *WRITTEN, "digests"]
        assert f["split"].dtype == np.uint8 and f["sample_id"].dtype == "S64"
        assert f["embeddings"].chunks is None and f["embeddings"].compression is None
    info = cache_info(path)
    assert info["shape"] == (N, D) and info["dtype"] == "float32"
    assert info["splits"] == {"train": 17, "val": 17, "test": 16}
    assert info["bytes"] == path.stat().st_size


def test_extra_attrs_are_stored_after_the_fixed_ones_sorted(tmp_path):
    path = _write(tmp_path / "x.h5", _data(), zeta=1, alpha="a")
    with h5py.File(path) as f:
        assert list(f.attrs) == ["schema", *WRITTEN, "alpha", "zeta", "digests"]


def test_float16_round_trip(tmp_path):
    data = _data()
    cache = read_cache(_write(tmp_path / "half.h5", data, dtype="float16"))
    assert cache.embeddings.dtype == np.float16 and cache.attrs["dtype"] == "float16"
    np.testing.assert_array_equal(cache.embeddings, data["embeddings"].astype(np.float16))
    fused = load_features([tmp_path / "half.h5"])
    assert fused.X.dtype == np.float32
    np.testing.assert_array_equal(fused.X, data["embeddings"].astype(np.float16))
    _edit(tmp_path / "half.h5", lambda f: f["embeddings"].__setitem__((3, 1), np.nan))
    with pytest.raises(CacheError, match=rf"{data['sample_id'][3]} \(row 3\) contain NaN"):
        load_features([tmp_path / "half.h5"])
    data["embeddings"][6, 0] = 1e5  # beyond float16's range: refused, not stored as inf
    with pytest.raises(CacheError, match=f"embeddings of sample {data['sample_id'][6]}"):
        _write(tmp_path / "half.h5", data, dtype="float16")


def test_identical_inputs_give_identical_bytes(tmp_path, umask):
    a = _write(tmp_path / "a" / "m.h5", _data())
    time.sleep(1.0)  # HDF5 object times have 1 s resolution: make any stored clock differ
    b = _write(tmp_path / "b" / "m.h5", _data(), batch=7)  # other batching, same content
    assert a.read_bytes() == b.read_bytes()
    assert file_sha256(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert stat.S_IMODE(a.stat().st_mode) == 0o644


def test_caches_in_different_orders_align_by_sample_id(tmp_path):
    a, b = _data(0), _data(1, dim=8)
    b["label"], b["split"] = a["label"], a["split"]
    perm = np.random.default_rng(2).permutation(N)
    pa = _write(tmp_path / "a.h5", a, backbone="a")
    pb = _write(tmp_path / "b.h5", b, order=perm, backbone="b")
    fused = load_features([pa, pb])
    assert fused.X.shape == (N, D + 8) and fused.dims == (D, 8) and fused.backbones == ("a", "b")
    np.testing.assert_array_equal(fused.X, np.hstack([a["embeddings"], b["embeddings"]]))
    np.testing.assert_array_equal(fused.logits[1], b["logits"])
    np.testing.assert_array_equal(fused.sample_id, a["sample_id"])
    np.testing.assert_array_equal(fused.y, a["label"])
    assert fused.checksums == {"a": file_sha256(pa), "b": file_sha256(pb)}
    # The manifest's order wins when one is given.
    m = _manifest({k: v[perm[::-1]] for k, v in a.items()})
    fused = load_features([pa, pb], backbones=["a", "b"], manifest=m)
    np.testing.assert_array_equal(fused.sample_id, m.sample_id)
    np.testing.assert_array_equal(fused.X[:, D:], b["embeddings"][perm[::-1]])
    np.testing.assert_array_equal(fused.split, m.split)


def test_over_budget_features_stay_in_the_caches_and_read_the_same_rows(tmp_path):
    a, b = _data(0), _data(1, dim=8)
    b["label"], b["split"] = a["label"], a["split"]
    perm = np.random.default_rng(2).permutation(N)
    pa = _write(tmp_path / "a.h5", a, backbone="a", dtype="float16")
    pb = _write(tmp_path / "b.h5", b, order=perm, backbone="b")  # read by scattered ranges
    m = _manifest({k: v[perm[::-1]] for k, v in a.items()})
    dense = load_features([pa, pb], manifest=m)
    row_bytes = (D + 8) * 4
    assert load_features([pa, pb], manifest=m, max_bytes=N * row_bytes).X.shape == (N, D + 8)
    lazy = load_features([pa, pb], manifest=m, max_bytes=N * row_bytes - 1)
    X = lazy.X
    assert isinstance(X, LazyRows) and X.shape == dense.X.shape and X.nbytes == dense.X.nbytes
    assert X.block_rows == max(1, (N * row_bytes - 1) // (32 * row_bytes)) == 1
    np.testing.assert_array_equal(X[:], dense.X)
    np.testing.assert_array_equal(X[7:31], dense.X[7:31])
    rows = np.array([0, 3, 4, 40, N - 1])
    np.testing.assert_array_equal(X[rows], dense.X[rows])
    X.block_rows = 3
    sub = X.take(rows[1:])  # a lazy subset, indexed from 0 again
    np.testing.assert_array_equal(sub[1:3], dense.X[rows[2:4]])
    blocks = sub.block_slices()
    assert [(s.start, s.stop) for s in blocks] == [(0, 3), (3, 4)]
    np.testing.assert_array_equal(np.concatenate([sub[s] for s in blocks]), dense.X[rows[1:]])
    assert X[np.array([], int)].shape == (0, D + 8)
    np.testing.assert_array_equal(lazy.y, dense.y)
    np.testing.assert_array_equal(lazy.logits[1], dense.logits[1])
    assert lazy.checksums == dense.checksums and lazy.max_bytes == N * row_bytes - 1


def test_lazy_rows_refuse_misuse_naming_what_is_allowed(good):
    path, _ = good
    X = load_features([path], max_bytes=0).X
    assert X.block_rows == 1
    with pytest.raises(TypeError, match="not read whole implicitly"):
        np.asarray(X)
    with pytest.raises(IndexError, match="selects rows only"):
        X[:, :4]
    with pytest.raises(IndexError, match="selects rows only"):
        X[3]
    with pytest.raises(IndexError, match=r"must increase and lie in \[0, 50\); got \[4, 2\]"):
        X[[4, 2]]
    with pytest.raises(IndexError, match="must increase"):
        X.take(np.array([0, N]))
    with pytest.raises(IndexError, match="step 2"):
        X[::2]


def test_lazy_rows_check_values_and_files_as_they_read(good):
    path, data = good
    X = load_features([path], max_bytes=0).X
    _edit(path, lambda f: f["embeddings"].__setitem__((7, 2), np.nan))  # same inode, new mtime
    with pytest.raises(CacheError, match="changed since it was read"):
        X[0:2]
    X = load_features([path], max_bytes=0).X  # the header reads no embedding values
    np.testing.assert_array_equal(X[0:7], data["embeddings"][:7])
    with pytest.raises(CacheError, match=rf"{data['sample_id'][7]} \(row 7\) contain NaN"):
        X[5:9]


def test_checksums_refused_after_the_file_is_replaced(good, tmp_path):
    path, data = good
    fused = load_features([path])
    _write(path, data, versions={"numpy": "3"})
    with pytest.raises(CacheError, match="changed since"):
        fused.checksums  # noqa: B018


def test_exception_mid_write_keeps_the_old_cache_and_no_temp_file(good):
    path, data = good
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):  # noqa: SIM117
        with CacheWriter(path, N, D, _attrs()) as w:
            w.write(0, *(data[k][:25] for k in ("embeddings", "logits", "sample_id", "label",
                                                "split")))  # fmt: skip
            assert w.tmp.exists()
            raise RuntimeError("boom")
    assert path.read_bytes() == before and read_cache(path).embeddings.shape == (N, D)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_writer_refuses_missing_rows_and_duplicate_ids(tmp_path):
    data = _data()
    with pytest.raises(CacheError, match="25 of 50 rows never written"):  # noqa: SIM117
        with CacheWriter(tmp_path / "x.h5", N, D, _attrs()) as w:
            w.write(0, *(data[k][:25] for k in ("embeddings", "logits", "sample_id", "label",
                                                "split")))  # fmt: skip
    data["sample_id"][3] = data["sample_id"][4]
    with pytest.raises(CacheError, match=f"sample_id '{data['sample_id'][4]}' appears 2 times"):
        _write(tmp_path / "x.h5", data)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CacheError, match="missing attributes"):
        CacheWriter(tmp_path / "x.h5", N, D, {"backbone": "x"})
    data = _data()
    data["embeddings"][5, 0] = np.nan
    with pytest.raises(CacheError, match=f"embeddings of sample {data['sample_id'][5]}"):
        _write(tmp_path / "x.h5", data)


def _corrupt_cases():
    """name -> (damage(path, data, tmp_path), text the error must contain)."""
    n2 = lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # noqa: E731
    return {
        "truncated": (lambda p, d, t: n2(p), "not a readable HDF5 file"),
        "not hdf5": (lambda p, d, t: p.write_text("sample_id,label\n"), "not a readable HDF5"),
        "killed writer": (lambda p, d, t: os.replace(killed_cache_writer(p), p),
                          "unreadable feature cache"),
        "schema": (lambda p, d, t: _edit(p, lambda f: f.attrs.__setitem__("schema", 7)),
                   "schema 7 is not 2; not a defuse feature cache of this version: re-run `defuse extract lite0`"),
        "duplicate id": (
            lambda p, d, t: _edit(p, lambda f: f["sample_id"].__setitem__(9, d["sample_id"][8])),
            f"sample_id '{_data()['sample_id'][8]}' appears 2 times (rows [8, 9])"),
        "nan": (lambda p, d, t: _edit(p, lambda f: f["embeddings"].__setitem__((7, 2), np.nan)),
                f"embeddings of sample {_data()['sample_id'][7]} (row 7) contain NaN or inf"),
        "inf": (lambda p, d, t: _edit(p, lambda f: f["embeddings"].__setitem__((4, 0), np.inf)),
                f"embeddings of sample {_data()['sample_id'][4]} (row 4)"),
        "inf logit": (lambda p, d, t: _edit(p, lambda f: f["logits"].__setitem__((1, 0), -np.inf)),
                      "logits of sample"),
        "label": (lambda p, d, t: _edit(p, lambda f: f["label"].__setitem__(2, 3)),
                  "label 3 of sample"),
        "split": (lambda p, d, t: _edit(p, lambda f: f["split"].__setitem__(2, 9)),
                  "split code 9 of sample"),
        "dim": (lambda p, d, t: _edit(p, lambda f: f.attrs.__setitem__("dim", 17)),
                "attribute dim=17 but the data say 16"),
        "missing": (lambda p, d, t: _edit(p, lambda f: f.__delitem__("logits")),
                    "missing attributes / datasets ['logits']"),
        "rows": (lambda p, d, t: _edit(p, lambda f: (f.__delitem__("label"),
                                                     f.create_dataset("label", data=np.zeros(49, int)))),
                 "label has 49 rows but embeddings has 50"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_corrupt_cases()))
def test_each_corruption_is_refused_by_reader_and_verify(good, tmp_path, case):
    path, data = good
    damage, message = _corrupt_cases()[case]
    damage(path, data, tmp_path)
    with pytest.raises(CacheError, match=str(path)) as err:
        read_cache(path)
    assert message in str(err.value)
    problems = verify_cache(path)
    assert len(problems) == 1 and message in problems[0]
    assert reusable_cache(path, _attrs()) is None  # corrupt: just no reuse
    with pytest.raises(CacheError) as err:
        load_features([path])
    assert message in str(err.value) and str(path) in str(err.value)


def test_nan_is_found_by_load_features_naming_sample_and_row(good):
    path, data = good
    _edit(path, lambda f: f["embeddings"].__setitem__((7, 2), np.nan))
    with pytest.raises(CacheError, match=rf"{data['sample_id'][7]} \(row 7\)"):
        load_features([path])


def test_caches_that_disagree_are_refused_naming_both(tmp_path):
    a, b = _data(0), _data(1)
    pa = _write(tmp_path / "a.h5", a, backbone="a")
    b["label"][10] = (a["label"][10] + 1) % C
    pb = _write(tmp_path / "b.h5", b, order=np.arange(N)[::-1], backbone="b")
    with pytest.raises(CacheError, match=f"sample {a['sample_id'][10]} has label") as err:
        load_features([pa, pb])
    assert str(pa) in str(err.value) and str(pb) in str(err.value)

    pb = _write(tmp_path / "b.h5", _data(1), backbone="b", manifest_sha256="f" * 64)
    with pytest.raises(CacheError, match=f"{pb} was extracted from manifest f+ but {pa}"):
        load_features([pa, pb])
    with pytest.raises(CacheError, match="the manifest is manifest"):
        load_features([pa], manifest=_manifest(a, sha="e" * 64))

    short = {k: v[:-1] for k, v in _data(1).items()}
    pb = _write(tmp_path / "b.h5", short, backbone="b")
    with pytest.raises(CacheError, match=rf"1 of the 50 ids in {pa} are missing from {pb} "
                                         rf"\(e.g. {a['sample_id'][-1]}\)"):  # fmt: skip
        load_features([pa, pb])

    pb = _write(tmp_path / "b.h5", _data(1), backbone="b", class_names=["x", "y", "z"])
    with pytest.raises(CacheError, match="class_names differ"):
        load_features([pa, pb])
    with pytest.raises(CacheError, match="backbones"):
        load_features([pa], backbones=["other"])


def test_verify_against_manifest_and_checkpoint(good):
    path, data = good
    assert verify_cache(path, manifest=_manifest(data), checkpoint_sha256="c" * 64) == []
    m = _manifest(data, sha="e" * 64)
    m.label = data["label"].copy()
    m.label[3] = (m.label[3] + 1) % C
    m.sample_id = [*m.sample_id[:-1], "0" * 64]
    m.split = [*m.split[:-1], "test"]
    problems = verify_cache(path, manifest=m, checkpoint_sha256="d" * 64)
    assert len(problems) == 3
    assert "made by checkpoint" in problems[0] and "manifest eeee" in problems[1]
    assert f"ids in the manifest are missing from {path} (e.g. {'0' * 64})" in problems[2]
    m.sample_id, m.sha256 = list(data["sample_id"]), MANIFEST_SHA
    label, split = verify_cache(path, manifest=m)
    assert f"sample {data['sample_id'][3]} has label 1 in the manifest but 0 in {path}" in label
    assert f"sample {data['sample_id'][-1]} has split 'test' in the manifest but 'val'" in split


def test_reusable_cache_needs_same_checkpoint_and_preprocessing(good, tmp_path):
    path, data = good
    assert reusable_cache(path, _attrs(checkpoint_sha256="d" * 64)) is None
    other = Preprocessing(240, "stretch", PREP.mean, PREP.std, "bicubic")
    assert reusable_cache(path, _attrs(preprocessing=other)) is None
    assert reusable_cache(path, _attrs(dtype="float16")) is None
    assert reusable_cache(path, _attrs(tta=True)) is None
    assert reusable_cache(tmp_path / "absent.h5", _attrs()) is None
    old = reusable_cache(path, _attrs(versions={}, manifest_sha256="e" * 64))  # not identity
    assert old is not None
    wanted = [data["sample_id"][7], "f" * 64, data["sample_id"][0]]
    np.testing.assert_array_equal(old.rows_for(wanted), [7, -1, 0])


def test_temp_file_sits_beside_the_target_and_stale_ones_go(tmp_path):
    w = CacheWriter(tmp_path / "lite0.h5", N, D, _attrs())
    assert w.tmp.parent == tmp_path and w.tmp.name.startswith(f".lite0.h5.tmp-{os.getpid()}-")
    killed_cache_writer(tmp_path / "lite0.h5")  # a killed extraction's temporary file, left behind
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".lite0.h5.tmp-")]) == 1
    _write(tmp_path / "lite0.h5", _data())
    assert [p.name for p in tmp_path.iterdir()] == ["lite0.h5"]
    assert read_cache(tmp_path / "lite0.h5").embeddings.shape == (N, D)


def test_random_damage_gives_a_cache_error_never_another_exception(good, tmp_path):
    """Truncations and bit flips anywhere in the file: each reader refuses the file cleanly
    (or reads it, when the flip hit padding) and never raises anything but CacheError."""
    path, _ = good
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    damaged = tmp_path / "damaged.h5"
    for trial in range(60):
        b = bytearray(data)
        if trial % 3 == 0:
            b = b[: rng.integers(len(b))]
        else:  # the first 4 KiB hold most of the metadata
            for i in rng.integers(4096 if trial % 3 == 1 else len(b), size=4):
                b[i] ^= 1 << rng.integers(8)
        damaged.write_bytes(bytes(b))
        for read in (read_cache, verify_cache, cache_info, lambda p: load_features([p]),
                     lambda p: reusable_cache(p, _attrs())):  # fmt: skip
            with contextlib.suppress(CacheError):
                read(damaged)


def test_reusable_cache_needs_the_same_fold_models(tmp_path):
    """A cross-fitted cache's train rows come from its fold models: other ones, or none where
    the cache had some, give no reuse; a plain cache (no fold models on either side) does."""
    data = _data()
    folded, plain = tmp_path / "folded.h5", tmp_path / "plain.h5"
    _write(folded, data, fold_checkpoint_sha256="a" * 64)
    _write(plain, data)
    assert reusable_cache(folded, _attrs(fold_checkpoint_sha256="a" * 64)) is not None
    assert reusable_cache(folded, _attrs(fold_checkpoint_sha256="b" * 64)) is None
    assert reusable_cache(folded, _attrs()) is None
    assert reusable_cache(plain, _attrs(fold_checkpoint_sha256="a" * 64)) is None
    assert reusable_cache(plain, _attrs()) is not None
