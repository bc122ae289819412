import csv
import hashlib
import io
import json
import stat
import warnings

import numpy as np
import pytest
from conftest import params_of
from PIL import Image

from pipeline.config import PrepareParams
from pipeline.data import (
    COLUMNS,
    ELPV_CLASSES,
    SPLITS,
    build_manifest,
    elpv_root,
    load_image,
    manifest_json_path,
    read_manifest,
    skipped_path,
    write_manifest,
)
from pipeline.errors import DataError


def _params(root, **kw):
    # 6 images a class satisfy these fractions (each class needs >= 4)
    kw = {"test_fraction": 0.25, "val_fraction": 0.34, **kw}
    return params_of(PrepareParams, "prepare", source="folder", root=str(root), **kw)


def _jpeg_bytes(size=(32, 32), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _pixels(path, **kw):
    im = load_image(path, **kw)
    assert im.mode == "RGB"
    return np.asarray(im)


# --- load_image: the mode policy ---------------------------------------------------------------


def test_sixteen_bit_png_keeps_the_high_byte(tmp_path):
    values = np.array([[0, 1000, 65535, 77 * 256 + 255]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    out = _pixels(tmp_path / "a.png")
    assert out[0, :, 0].tolist() == [0, 3, 255, 77]
    assert (out[..., 0] == out[..., 2]).all()


def test_thirty_two_bit_integer_is_clipped_then_shifted(tmp_path):
    Image.fromarray(np.array([[-5, 70000, 200 * 256]], dtype=np.int32)).save(tmp_path / "a.tif")
    assert Image.open(tmp_path / "a.tif").mode == "I"
    assert _pixels(tmp_path / "a.tif")[0, :, 1].tolist() == [0, 255, 200]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    out = _pixels(tmp_path / "c.jpg").astype(int)
    assert np.abs(out - [0, 255, 255]).max() <= 3


def test_palette_png_with_and_without_transparency(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([200, 100, 50, 10, 20, 30] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.save(tmp_path / "p.png")
    out = _pixels(tmp_path / "p.png")
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[1, 1].tolist() == [10, 20, 30]
    im.save(tmp_path / "pt.png", transparency=1)  # index 1 fully transparent -> black
    out = _pixels(tmp_path / "pt.png")
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[1, 1].tolist() == [0, 0, 0]


def test_rgba_and_la_are_composited_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 128], [200, 100, 50, 255], [9, 9, 9, 0]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = _pixels(tmp_path / "a.png")
    assert out[0].tolist() == [[100, 50, 25], [200, 100, 50], [0, 0, 0]]
    Image.fromarray(np.array([[[100, 255], [100, 51]]], dtype=np.uint8), "LA").save(
        tmp_path / "la.png"
    )
    assert _pixels(tmp_path / "la.png")[0, :, 0].tolist() == [100, 20]


def test_grayscale_is_replicated(tmp_path):
    Image.fromarray(np.array([[7, 250]], dtype=np.uint8), "L").save(tmp_path / "g.png")
    assert _pixels(tmp_path / "g.png").tolist() == [[[7, 7, 7], [250, 250, 250]]]


def test_keep_gray_returns_the_channel_the_policy_replicates(tmp_path):
    sources = {
        "l.png": np.array([[7, 250]], dtype=np.uint8),
        "one.png": np.array([[True, False]]),
        "i16.png": np.array([[1000, 65535]], dtype=np.uint16),
        "i32.tif": np.array([[-5, 70000]], dtype=np.int32),
        "f.tif": np.array([[-3.2, 254.5]], dtype=np.float32),
    }
    for name, values in sources.items():
        Image.fromarray(values).save(tmp_path / name)
        gray = load_image(tmp_path / name, keep_gray=True)
        assert gray.mode == "L", name
        assert np.array_equal(np.asarray(gray.convert("RGB")), _pixels(tmp_path / name)), name
    Image.new("RGB", (2, 2), (1, 2, 3)).save(tmp_path / "rgb.png")
    assert load_image(tmp_path / "rgb.png", keep_gray=True).mode == "RGB"


def test_jpeg_draft_decodes_at_reduced_scale_never_below_size(tmp_path):
    (tmp_path / "big.jpg").write_bytes(_jpeg_bytes((640, 480)))
    assert load_image(tmp_path / "big.jpg").size == (640, 480)
    small = load_image(tmp_path / "big.jpg", size=100)
    assert small.size == (160, 120)  # scale 1/4; 1/8 would be 80 x 60 < 100
    assert load_image(tmp_path / "big.jpg", size=300).size == (640, 480)


# --- load_image: bad files ---------------------------------------------------------------------


def test_truncated_jpeg_is_an_error(tmp_path):
    data = _jpeg_bytes((64, 64))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg.*truncated"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(DataError, match="truncated"):  # also at reduced scale
        load_image(tmp_path / "cut.jpg", size=8)


def test_text_file_is_not_an_image(tmp_path):
    (tmp_path / "fake.jpg").write_text("not a picture")
    with pytest.raises(DataError, match=r"fake\.jpg: not an image"):
        load_image(tmp_path / "fake.jpg")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: cannot read"):
        load_image(tmp_path / "nope.png")


def test_image_over_max_pixels_is_refused(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "big.png")
    with pytest.raises(DataError, match=r"big\.png: 32x32 = 1024 pixels exceeds max_pixels=1000"):
        load_image(tmp_path / "big.png", max_pixels=1000)
    assert load_image(tmp_path / "big.png", max_pixels=1024).size == (32, 32)


# --- build_manifest: folder source -------------------------------------------------------------


def test_folder_manifest_rows(image_folder, tmp_path):
    root = image_folder({"scratch": 6, "dent": 7})
    (root / "dent" / ".DS_Store").write_text("ignored")
    prepared = build_manifest(_params(root))
    assert prepared.class_names == ("dent", "scratch")  # sorted sub-folders
    assert len(prepared.rows) == 13
    paths = [r.path for r in prepared.rows]
    assert paths == sorted(paths) and paths[0] == "dent/000.png"
    row = prepared.rows[0]
    assert row.sample_id == hashlib.sha256((root / row.path).read_bytes()).hexdigest()
    assert (row.label, row.label_name) == (0, "dent")
    for name in prepared.class_names:  # every class in every split
        assert all(prepared.counts()["split_class"][s][name] >= 1 for s in SPLITS)


def test_explicit_classes_set_label_order(image_folder):
    root = image_folder({"a": 6, "b": 6, "c": 6})
    prepared = build_manifest(_params(root, classes=("c", "a")))  # b left out
    assert prepared.class_names == ("c", "a")
    assert {(r.label, r.path[0]) for r in prepared.rows} == {(0, "c"), (1, "a")}


def test_listed_class_without_folder(image_folder):
    root = image_folder({"a": 6, "b": 6})
    with pytest.raises(DataError, match=r"\['zzz'\].*no such sub-folder"):
        build_manifest(_params(root, classes=("a", "zzz")))


def test_empty_class_folder(image_folder):
    root = image_folder({"a": 6, "b": 6})
    (root / "empty").mkdir()
    (root / "empty" / ".hidden").write_text("")
    with pytest.raises(DataError, match=r"empty: class folder 'empty' holds no files"):
        build_manifest(_params(root))


def test_single_class(image_folder):
    root = image_folder({"only": 6})
    with pytest.raises(DataError, match=r"at least 2 class sub-folders.*\['only'\]"):
        build_manifest(_params(root))


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        build_manifest(_params(tmp_path / "absent"))


def test_class_too_small_to_stratify(image_folder):
    root = image_folder({"big": 8, "tiny": 2})
    with pytest.raises(DataError, match=r"class 'tiny' has 2\. .*needs at least 4"):
        build_manifest(_params(root))


def test_bad_images_are_all_listed(image_folder):
    root = image_folder({"a": 6, "b": 6})
    data = _jpeg_bytes((64, 64))
    (root / "a" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "a" / "fake.jpg").write_text("text")
    (root / "b" / "notes.txt").write_text("text")
    with pytest.raises(DataError) as info:
        build_manifest(_params(root))
    message = str(info.value)
    assert "3 bad image(s)" in message
    assert "a/cut.jpg: cannot decode image" in message and "truncated" in message
    assert "a/fake.jpg: not an image" in message and "b/notes.txt: not an image" in message
    assert "on_bad_image: skip" in message


def test_bad_image_listing_is_capped(image_folder):
    root = image_folder({"a": 6, "b": 6})
    for i in range(25):
        (root / "b" / f"junk{i:02d}.txt").write_text("x")
    with pytest.raises(DataError, match=r"25 bad image\(s\)") as info:
        build_manifest(_params(root))
    assert "... and 5 more" in str(info.value)
    assert str(info.value).count("not an image") == 20


def test_image_over_max_pixels_is_a_bad_image(image_folder):
    root = image_folder({"a": 6, "b": 6}, size=8)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "a" / "huge.png")
    with pytest.raises(DataError, match=r"a/huge\.png: 32x32 = 1024 pixels exceeds"):
        build_manifest(_params(root, max_pixels=500))


def test_skip_mode_leaves_bad_images_out(image_folder, tmp_path):
    root = image_folder({"a": 6, "b": 6})
    (root / "a" / "fake.jpg").write_text("text")
    (root / "b" / "notes.txt").write_text("text")
    prepared = build_manifest(_params(root, on_bad_image="skip"))
    assert [p for p, _ in prepared.skipped] == ["a/fake.jpg", "b/notes.txt"]
    assert len(prepared.rows) == 12
    out = tmp_path / "cache" / "manifest.csv"
    write_manifest(out, prepared)
    with skipped_path(out).open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "reason"]
    assert [r[0] for r in rows[1:]] == ["a/fake.jpg", "b/notes.txt"]
    assert "not an image" in rows[1][1]
    assert json.loads(manifest_json_path(out).read_text())["skipped"] == 2


def test_duplicates_within_a_class_collapse_with_a_warning(image_folder):
    root = image_folder({"a": 6, "b": 6})
    (root / "a" / "zz_copy.png").write_bytes((root / "a" / "001.png").read_bytes())
    with pytest.warns(UserWarning, match=r"(?s)1 duplicate image.*a/001\.png = a/zz_copy\.png"):
        prepared = build_manifest(_params(root))
    paths = [r.path for r in prepared.rows]
    assert "a/001.png" in paths and "a/zz_copy.png" not in paths
    assert prepared.duplicates == (("a/001.png", "a/zz_copy.png"),)
    assert len({r.sample_id for r in prepared.rows}) == len(prepared.rows) == 12


def test_duplicate_across_classes_is_an_error(image_folder):
    root = image_folder({"a": 6, "b": 6})
    (root / "b" / "copy.png").write_bytes((root / "a" / "002.png").read_bytes())
    with pytest.raises(DataError, match=r"a/002\.png \(a\) = b/copy\.png \(b\)"):
        build_manifest(_params(root))


# --- files -------------------------------------------------------------------------------------


def test_same_inputs_give_identical_bytes(image_folder, tmp_path, umask):
    root = image_folder({"a": 6, "b": 6, "c": 7})
    outs = [tmp_path / name / "manifest.csv" for name in ("one", "two", "seed1")]
    write_manifest(outs[0], build_manifest(_params(root)))
    write_manifest(outs[1], build_manifest(_params(root)))
    write_manifest(outs[2], build_manifest(_params(root, seed=1)))
    for name in ("manifest.csv", "manifest.json", "skipped.csv"):
        assert (outs[0].parent / name).read_bytes() == (outs[1].parent / name).read_bytes()
    assert b"\r" not in outs[0].read_bytes()
    one, other = read_manifest(outs[0]), read_manifest(outs[2])
    assert one.rel_path == other.rel_path  # rows sorted by path: a new seed only moves splits
    assert one.split != other.split
    assert sorted(p.name for p in outs[0].parent.iterdir()) == [
        "manifest.csv",
        "manifest.json",
        "skipped.csv",
    ]  # no temporary files left
    assert {stat.S_IMODE(p.stat().st_mode) for p in outs[0].parent.iterdir()} == {0o644}


def test_read_manifest_round_trip(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image_folder({"a": 6, "b": 6}, root=tmp_path / "imgs")
    out = tmp_path / "cache" / "manifest.csv"
    prepared = build_manifest(_params("imgs"))
    write_manifest(out, prepared)
    meta = json.loads(manifest_json_path(out).read_text())
    assert meta["root"] == "imgs"  # as given, so the cache does not carry this machine's path
    assert meta["counts"]["class"] == {"a": 6, "b": 6}

    manifest = read_manifest(out)
    assert len(manifest) == 12
    assert manifest.root == tmp_path / "imgs" and manifest.root.is_absolute()
    assert manifest.class_names == ("a", "b")
    assert manifest.label.dtype == np.int64
    assert manifest.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert manifest.image_path(0).is_file()
    parts = np.concatenate([manifest.indices(s) for s in SPLITS])
    assert sorted(parts.tolist()) == list(range(12))
    assert all(manifest.split[i] == "val" for i in manifest.indices("val"))
    assert list(manifest.sample_id) == [r.sample_id for r in prepared.rows]


def _rewrite(path, edit):
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda ls: ls.__setitem__(0, "sample_id,path,label"), "columns must be"),
        (lambda ls: ls.__setitem__(2, ls[2].replace(",0,a,", ",1,a,")), "row 3: label 1 and"),
        (lambda ls: ls.__setitem__(3, ls[3].rsplit(",", 1)[0] + ",holdout"), "row 4: split"),
        (lambda ls: ls.append(ls[1]), r"row 14: sample_id '[0-9a-f]{64}' repeats row 2"),
        (lambda ls: ls.__setitem__(5, ls[5].replace(",0,a,", ",x,a,")), "row 6: label 'x'"),
        (lambda ls: ls.__setitem__(5, ls[5] + ",extra"), "row 6: expected 5 fields"),
        (lambda ls: ls.__setitem__(2, "xyz" + ls[2][64:]), "row 3: sample_id 'xyz' is not"),
        (lambda ls: ls.__delitem__(slice(1, None)), "has no rows"),
    ],
)
def test_read_manifest_names_file_and_row(image_folder, tmp_path, edit, match):
    out = tmp_path / "manifest.csv"
    write_manifest(out, build_manifest(_params(image_folder({"a": 6, "b": 6}))))
    _rewrite(out, edit)
    with pytest.raises(DataError, match=match) as info:
        read_manifest(out)
    assert str(out) in str(info.value)


def test_read_manifest_without_sidecar(tmp_path):
    (tmp_path / "manifest.csv").write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(DataError, match=r"manifest\.json: not found"):
        read_manifest(tmp_path / "manifest.csv")


# --- ELPV --------------------------------------------------------------------------------------


def _elpv_labels():
    """(probability, cell type) per image, straight from the package's labels.csv."""
    rows = [line.split() for line in (elpv_root() / "labels.csv").read_text().splitlines()]
    return {r[0]: (float(r[1]), r[2]) for r in rows if r}


@pytest.fixture(scope="module")
def elpv4(tmp_path_factory):
    out = tmp_path_factory.mktemp("elpv") / "manifest.csv"
    params = params_of(
        PrepareParams, "prepare", source="elpv", test_fraction=0.25, val_fraction=0.15
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ELPV has no duplicates to warn about
        write_manifest(out, build_manifest(params))
    return read_manifest(out)


def test_elpv_four_classes(elpv4):
    assert len(elpv4) == 2624
    assert elpv4.class_names == ELPV_CLASSES[4]
    assert np.bincount(elpv4.label).tolist() == [1508, 295, 106, 715]
    assert elpv4.root == elpv_root()
    assert elpv4.image_path(0).is_file()
    assert json.loads(manifest_json_path(elpv4.path).read_text())["root"] is None
    labels = _elpv_labels()
    levels = [round(labels[p][0] * 3) for p in elpv4.rel_path]
    assert levels == elpv4.label.tolist()


def test_elpv_splits_are_stratified_by_class_and_cell_type(elpv4):
    labels = _elpv_labels()
    cell = np.array([labels[p][1] for p in elpv4.rel_path])
    assert (cell == "mono").sum() == 1074 and (cell == "poly").sum() == 1550
    assert len(elpv4.indices("test")) == 656  # 25 %, as the ELPV authors' split
    overall = np.bincount(elpv4.label, minlength=4) / len(elpv4)
    for split in SPLITS:
        idx = elpv4.indices(split)
        share = np.bincount(elpv4.label[idx], minlength=4) / len(idx)
        assert np.abs(share - overall).max() < 0.01, split
        for label in range(4):  # within a class, mono/poly as overall
            members = elpv4.label == label
            mono = (cell[members] == "mono").mean()
            in_split = np.isin(np.flatnonzero(members), idx)
            assert abs((cell[members][in_split] == "mono").mean() - mono) < 0.06


def test_elpv_two_classes():
    prepared = build_manifest(params_of(PrepareParams, "prepare", source="elpv", elpv_classes=2))
    labels = _elpv_labels()
    defective = sum(p >= 0.5 for p, _ in labels.values())
    assert (len(labels), defective) == (2624, 821)
    assert prepared.class_names == ("functional", "defective")
    assert prepared.counts()["class"] == {"functional": 2624 - defective, "defective": defective}
    assert all(r.label == int(labels[r.path][0] >= 0.5) for r in prepared.rows)
