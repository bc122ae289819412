import csv
import hashlib
import io
import json
import math
import os
import stat
import warnings

import numpy as np
import pytest
from conftest import params_of
from PIL import Image

from pipeline.config import PrepareParams
from pipeline.data import images
from pipeline.data.images import decoded_channels
from pipeline.data.manifest import (
    COLUMNS,
    build_manifest,
    manifest_json_path,
    read_manifest,
    skipped_path,
    write_manifest,
)
from pipeline.data.sources import ELPV_CLASSES, elpv_root
from pipeline.data.splits import SPLITS
from pipeline.errors import DataError

MAX_PIXELS = 64_000_000  # params.yaml's prepare.max_pixels


def load_image(path, **kw):
    return images.load_image(path, **{"max_pixels": MAX_PIXELS, **kw})


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


def test_decoded_channels_foretells_keep_gray_from_the_header(tmp_path):
    images = {
        "l.png": Image.new("L", (3, 2)),
        "i16.png": Image.fromarray(np.array([[1000, 65535]], dtype=np.uint16)),
        "grey.jpg": Image.new("L", (40, 30)),
        "rgb.jpg": Image.new("RGB", (40, 30)),
        "cmyk.jpg": Image.new("CMYK", (40, 30)),
        "p.png": Image.new("P", (3, 2)),
        "la.png": Image.new("LA", (3, 2)),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
        decoded = load_image(tmp_path / name, size=8, keep_gray=True)
        assert decoded_channels(tmp_path / name) == len(decoded.getbands()), name
    (tmp_path / "fake.png").write_text("no")
    with pytest.raises(DataError, match=r"fake\.png: cannot read the image header"):
        decoded_channels(tmp_path / "fake.png")


def test_a_file_whose_bytes_left_its_sample_id_is_refused(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "a.png")
    sha = hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()
    assert load_image(tmp_path / "a.png", sha256=sha).size == (4, 4)
    Image.new("RGB", (4, 4), (3, 2, 1)).save(tmp_path / "a.png")
    with pytest.raises(
        DataError, match=rf"a\.png: its bytes no longer hash to its sample_id {sha}"
    ):
        load_image(tmp_path / "a.png", sha256=sha)


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
    with pytest.raises(DataError, match=r"at least 2 class sub-folders.*; found \['only'\]"):
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


# --- build_manifest: labels file (csv) --------------------------------------------------------


def _csv_params(labels, **kw):
    kw = {"test_fraction": 0.25, "val_fraction": 0.34, **kw}
    return params_of(PrepareParams, "prepare", source="csv", root=None, labels=str(labels), **kw)


def _labels_file(root, rows, header="path,label,split"):
    """Write root/labels.csv from (path, label[, split]) tuples; return its path."""
    lines = [header, *(",".join(row) for row in rows)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def _csv_dataset(image_folder, counts, split=lambda cls, i: ""):
    """Images in root/<class>/, listed in root/labels.csv with ``split(class, i)``."""
    root = image_folder(counts)
    rows = [(f"{c}/{i:03d}.png", c, split(c, i)) for c, n in counts.items() for i in range(n)]
    return root, _labels_file(root, rows)


def test_csv_rows_paths_and_class_order(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, labels = _csv_dataset(image_folder, {"scratch": 6, "dent": 7})
    prepared = build_manifest(_csv_params(labels.relative_to(tmp_path)))
    assert prepared.class_names == ("dent", "scratch")  # sorted labels
    assert prepared.root == root and len(prepared.rows) == 13
    assert prepared.rows[0].path == "dent/000.png"  # relative to the labels file's folder
    assert all(prepared.counts()["split_class"][s]["dent"] >= 1 for s in SPLITS)
    ordered = build_manifest(_csv_params(labels, classes=("scratch", "dent")))
    assert ordered.class_names == ("scratch", "dent")

    out = tmp_path / "cache" / "manifest.csv"
    write_manifest(out, prepared)
    meta = json.loads(manifest_json_path(out).read_text())
    assert (meta["source"], meta["root"]) == ("csv", "images")  # as given
    manifest = read_manifest(out)
    assert manifest.root == root and manifest.image_path(0).is_file()


def test_csv_given_splits_are_kept_exactly(image_folder):
    def split(cls, i):
        return ("test", "val", "train", "train")[i % 4]

    _, labels = _csv_dataset(image_folder, {"a": 8, "b": 8}, split)
    prepared = build_manifest(_csv_params(labels))
    assert [r.split for r in prepared.rows] == [
        split(r.label_name, int(r.path[2:5])) for r in prepared.rows
    ]


def test_csv_fixed_test_split_and_the_rest_drawn(image_folder):
    """A customer's fixed test set: exactly those rows; the others only train and val."""
    _, labels = _csv_dataset(image_folder, {"a": 9, "b": 9}, lambda c, i: "test" if i < 2 else "")
    prepared = build_manifest(_csv_params(labels))
    test = [r.path for r in prepared.rows if r.split == "test"]
    assert test == ["a/000.png", "a/001.png", "b/000.png", "b/001.png"]
    val = prepared.counts()["split_class"]["val"]
    assert sum(val.values()) == 5 and min(val.values()) == 2  # ceil(0.34 x 14), stratified


def test_csv_train_and_test_only_draws_val_from_train(image_folder):
    """The fusion paper's 1879 / 257 split names no val: it is carved from the train rows."""
    _, labels = _csv_dataset(image_folder, {"a": 8, "b": 8}, lambda c, i: ("train", "test")[i % 2])
    prepared = build_manifest(_csv_params(labels))
    for row in prepared.rows:
        given = ("train", "test")[int(row.path[2:5]) % 2]
        assert row.split == given or (given, row.split) == ("train", "val")
    assert prepared.counts()["split"] == {"train": 5, "val": 3, "test": 8}  # ceil(0.34 x 8) val


def test_csv_bad_rows_are_all_listed_with_their_lines(image_folder):
    root = image_folder({"a": 6, "b": 6})
    rows = [(f"{c}/{i:03d}.png", c, "") for c in "ab" for i in range(6)]
    rows[2] = ("a/missing.png", "a", "")
    rows[4] = ("a/004.png", "", "")
    rows[6] = ("b/000.png", "b", "holdout")
    rows[8] = ("b/000.png", "b", "")
    rows[9] = ("/etc/passwd", "b", "")
    rows[10] = ("../b/010.png", "b", "")
    labels = _labels_file(root, [*rows, ("b/005.png", "b", "", "extra")])
    with pytest.raises(DataError) as info:
        build_manifest(_csv_params(labels))
    message = str(info.value)
    assert f"7 bad row(s) in {labels}" in message
    for expected in (
        "line 4: a/missing.png: no such file",
        "line 6: empty label",
        "line 8: split 'holdout' is not one of ['train', 'val', 'test']",
        "line 10: path 'b/000.png' repeats line 8",
        "line 11: path '/etc/passwd' must be relative to",
        "line 12: path '../b/010.png' must be relative to",
        "line 14: expected 3 fields, got 4",
    ):
        assert expected in message


@pytest.mark.parametrize("header", ["file,label", "path,label,spilt", "path", "path,label,label"])
def test_csv_header_must_name_path_and_label(image_folder, header):
    labels = _labels_file(image_folder({"a": 6, "b": 6}), [], header=header)
    with pytest.raises(DataError, match=r"line 1: the header must name the columns path and label"):
        build_manifest(_csv_params(labels))


def test_csv_without_split_column_and_classes_that_leave_labels_out(image_folder):
    root = image_folder({"a": 6, "b": 6, "c": 6})
    rows = [(f"{c}/{i:03d}.png", c) for c in "abc" for i in range(6)]
    labels = _labels_file(root, rows, header="label,path")
    labels.write_text("label,path\n" + "".join(f"{lab},{p}\n" for p, lab in rows))
    with pytest.warns(UserWarning, match=r"6 row\(s\) with labels \['b'\] left out"):
        prepared = build_manifest(_csv_params(labels, classes=("c", "a")))
    assert prepared.class_names == ("c", "a") and len(prepared.rows) == 12
    with pytest.raises(DataError, match=r"prepare.classes lists 'z' but no row"):
        build_manifest(_csv_params(labels, classes=("a", "z")))


def test_csv_given_splits_must_leave_train_for_every_class(image_folder):
    _, labels = _csv_dataset(
        image_folder, {"a": 6, "b": 6}, lambda c, i: "test" if c == "b" else ""
    )
    with pytest.raises(DataError, match=r"leave no train image of class 'b'"):
        build_manifest(_csv_params(labels))


def test_missing_labels_file(tmp_path):
    with pytest.raises(DataError, match=r"prepare.labels '.*absent.csv': cannot read"):
        build_manifest(_csv_params(tmp_path / "absent.csv"))


# --- prepare.include / exclude ------------------------------------------------------------------


def _with_masks(image_folder):
    """root/<class>/Imgs/<i>.jpg images with <i>.png masks beside them (the MT tiles layout)."""
    root = image_folder({"blowhole": 6, "crack": 6})
    for png in sorted(root.rglob("*.png")):
        imgs = png.parent / "Imgs"
        imgs.mkdir(exist_ok=True)
        Image.open(png).save(imgs / f"{png.stem}.jpg", quality=95)
        Image.new("L", (8, 8), int(png.stem) * 40).save(imgs / png.name)  # the mask
        png.unlink()
    return root


def test_include_takes_the_images_and_not_the_masks_beside_them(image_folder):
    root = _with_masks(image_folder)
    with pytest.raises(DataError, match="identical file"):  # the masks of both classes are alike
        build_manifest(_params(root))
    for patterns in (
        {"include": ("*.jpg",)},
        {"exclude": ("*.png",)},
        {"include": ("Imgs/*.jpg",)},
    ):
        prepared = build_manifest(_params(root, **patterns))
        assert len(prepared.rows) == 12, patterns
        assert all(r.path.endswith(".jpg") and "/Imgs/" in r.path for r in prepared.rows)
    # a pattern with "/" is matched within the class folder: the class name is not part of it
    with pytest.raises(DataError, match=r"class folder 'blowhole' passes prepare.include"):
        build_manifest(_params(root, include=("blowhole/Imgs/*.jpg",)))


def test_class_folder_left_empty_by_the_patterns_is_named(image_folder):
    root = _with_masks(image_folder)
    for png in (root / "crack" / "Imgs").glob("*.jpg"):
        png.unlink()
    with pytest.raises(DataError) as info:
        build_manifest(_params(root, include=("*.jpg",)))
    assert "none of the 6 file(s) of class folder 'crack' passes prepare.include ['*.jpg']" in str(
        info.value
    )


def test_patterns_filter_the_labels_file_too(image_folder):
    root = _with_masks(image_folder)
    rows = [(p.relative_to(root).as_posix(), p.parts[-3]) for p in sorted(root.rglob("*.*g"))]
    labels = _labels_file(root, rows, header="path,label")
    prepared = build_manifest(_csv_params(labels, exclude=("*.png",)))
    assert len(prepared.rows) == 12 and all(r.path.endswith(".jpg") for r in prepared.rows)
    with pytest.raises(DataError, match=r"every one of the 12 row\(s\) of class 'crack' is left"):
        build_manifest(_csv_params(labels, exclude=("crack/*",)))


# --- near-duplicates ----------------------------------------------------------------------------


def _reencoded_copy(src, dst):
    """A 3/4-size JPEG (quality 70) of ``src``: what a re-export or a web download makes."""
    image = Image.open(src).convert("RGB")
    small = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BILINEAR)
    small.save(dst, "JPEG", quality=70)


def _smooth_folder(root, counts, size=64, seed=0):
    """Images of smooth random blobs (a photo-like spectrum), each clearly its own."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            blobs = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(blobs).resize((size, size), Image.Resampling.BICUBIC)
            image.save(root / name / f"{i:03d}.png")
    return root


def test_reencoded_copy_in_another_class_is_caught_and_kept_in_one_split(tmp_path):
    root = _smooth_folder(tmp_path / "images", {"a": 12, "b": 12})
    plain = build_manifest(_params(root))
    assert plain.near_duplicates == ()  # distinct images are not grouped
    original = next(r for r in plain.rows if r.split == "train")
    _reencoded_copy(root / original.path, root / "b" / "zz_copy.jpg")
    with pytest.warns(UserWarning, match=r"(?s)1 near-duplicate group.*span classes.*zz_copy"):
        prepared = build_manifest(_params(root))
    assert prepared.near_duplicates == ((original.path, "b/zz_copy.jpg"),)
    split = {r.path: r.split for r in prepared.rows}
    assert split[original.path] == split["b/zz_copy.jpg"]


def test_reencoded_copy_never_straddles_splits(tmp_path):
    root = _smooth_folder(tmp_path / "images", {"a": 12, "b": 12})
    for i in range(4):
        _reencoded_copy(root / "a" / f"{i:03d}.png", root / "a" / f"copy{i}.jpg")
    for seed in range(5):
        prepared = build_manifest(_params(root, seed=seed))
        split = {r.path: r.split for r in prepared.rows}
        assert len(prepared.near_duplicates) == 4
        assert all(split[f"a/{i:03d}.png"] == split[f"a/copy{i}.jpg"] for i in range(4))
        # ceil(0.25 x 28) test, ceil(0.34 x 21) val: exact although pairs move together
        assert prepared.counts()["split"] == {"train": 13, "val": 8, "test": 7}
    off = build_manifest(_params(root, near_duplicate_bits=None))
    assert off.near_duplicates == ()


def test_near_duplicates_across_given_splits_are_kept_as_given_with_a_warning(tmp_path):
    root = _smooth_folder(tmp_path / "images", {"a": 8, "b": 8})
    _reencoded_copy(root / "a" / "000.png", root / "a" / "copy.jpg")  # given test, below
    _reencoded_copy(root / "b" / "007.png", root / "b" / "copy.jpg")  # undecided
    rows = [(f"{c}/{i:03d}.png", c, "test" if i == 7 else "") for c in "ab" for i in range(8)]
    rows[0] = ("a/000.png", "a", "train")
    labels = _labels_file(root, [*rows, ("a/copy.jpg", "a", "test"), ("b/copy.jpg", "b", "")])
    with pytest.warns(UserWarning, match=r"2 near-duplicate group\(s\).*straddle") as caught:
        prepared = build_manifest(_csv_params(labels))
    assert "a/copy.jpg (a, test)" in str(caught[0].message)
    split = {r.path: r.split for r in prepared.rows}
    assert split["a/000.png"] in ("train", "val") and split["a/copy.jpg"] == "test"
    # the fixed test set takes no drawn row, not even a near-duplicate of one of its images
    assert split["b/007.png"] == "test" and split["b/copy.jpg"] != "test"
    assert sorted(p for p, s in split.items() if s == "test") == [
        "a/007.png",
        "a/copy.jpg",
        "b/007.png",
    ]


def test_elpv_as_a_labels_file_keeps_its_fixed_test_split(elpv4, tmp_path):
    """The issue's check: a CSV-labelled copy of ELPV with a fixed test split gives exactly it."""
    (tmp_path / "images").symlink_to(elpv_root() / "images")
    labels = dict(zip(elpv4.rel_path, elpv4.label.tolist(), strict=True))
    test = set(elpv4.rel_path[i] for i in elpv4.indices("test"))
    rows = [(p, elpv4.class_names[labels[p]], "test" if p in test else "") for p in sorted(labels)]
    params = params_of(
        PrepareParams,
        "prepare",
        source="csv",
        root=None,
        labels=str(_labels_file(tmp_path, rows)),
        seed=5,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ELPV's cross-class and straddling groups
        prepared = build_manifest(params)
    assert {r.path for r in prepared.rows if r.split == "test"} == test
    assert prepared.counts()["split"]["val"] == math.ceil(0.15 * (2624 - 656))


def test_manifest_json_lists_the_groups(tmp_path):
    root = _smooth_folder(tmp_path / "images", {"a": 8, "b": 8})
    _reencoded_copy(root / "a" / "003.png", root / "a" / "copy.jpg")
    out = tmp_path / "manifest.csv"
    write_manifest(out, build_manifest(_params(root)))
    meta = json.loads(manifest_json_path(out).read_text())
    assert meta["near_duplicate_groups"] == [["a/003.png", "a/copy.jpg"]]
    assert meta["params"]["near_duplicate_bits"] == 4


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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_manifest(out, build_manifest(params))
    # no identical files; the one warning: sister cells (one ingot) that differ in label
    assert [str(w.message).split(" (")[0] for w in caught] == ["49 near-duplicate group(s)"]
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


def test_elpv_near_duplicate_groups_each_sit_in_one_split(elpv4):
    groups = json.loads(manifest_json_path(elpv4.path).read_text())["near_duplicate_groups"]
    split = dict(zip(elpv4.rel_path, elpv4.split, strict=True))
    assert len(groups) > 100  # sister cells cut from one ingot
    assert all(len({split[p] for p in group}) == 1 for group in groups)


def test_elpv_two_classes():
    prepared = build_manifest(params_of(PrepareParams, "prepare", source="elpv", elpv_classes=2))
    labels = _elpv_labels()
    defective = sum(p >= 0.5 for p, _ in labels.values())
    assert (len(labels), defective) == (2624, 821)
    assert prepared.class_names == ("functional", "defective")
    assert prepared.counts()["class"] == {"functional": 2624 - defective, "defective": defective}
    assert all(r.label == int(labels[r.path][0] >= 0.5) for r in prepared.rows)


# --- what is not a regular file, and advice that fits -------------------------------------------


def _specials(folder):
    """A FIFO and a symlink to /dev/zero in ``folder``: opening the one blocks, reading the
    other never ends."""
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")


def test_a_fifo_or_device_in_a_class_folder_is_refused_unopened(image_folder):
    root = image_folder({"a": 6, "b": 6})
    os.mkfifo(root / "a" / "pipe.png")
    with pytest.raises(DataError, match=r"a/pipe\.png: cannot read image file: a FIFO"):
        build_manifest(_params(root))
    (root / "a" / "pipe.png").unlink()
    (root / "b" / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"b/zero\.png: cannot read image file: a character"):
        build_manifest(_params(root, on_bad_image="skip"))


def test_labels_rows_naming_a_fifo_or_device_are_bad_rows(image_folder):
    root, labels = _csv_dataset(image_folder, {"a": 6, "b": 6})
    _specials(root / "a")
    with labels.open("a") as f:
        f.write("a/pipe.png,a,\na/zero.png,b,\n")
    with pytest.raises(DataError) as caught:
        build_manifest(_csv_params(labels))
    assert str(caught.value).splitlines()[1:] == [
        "  line 14: a/pipe.png: a FIFO (named pipe), not a regular file",
        "  line 15: a/zero.png: a character device, not a regular file",
    ]


def test_a_labels_field_over_the_csv_limit_is_one_clean_line(image_folder):
    _, labels = _csv_dataset(image_folder, {"a": 6, "b": 6})
    with labels.open("a") as f:
        f.write(f"a/000.png,{'x' * 200_000},\n")
    with pytest.raises(
        DataError, match=r"labels\.csv, line 14: not a labels row: field larger"
    ) as e:
        build_manifest(_csv_params(labels))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("fractions", "advice"),
    [
        ({"test_fraction": 0.99}, "lower test_fraction (now 0.0034 of each goes to val)"),
        ({"test_fraction": 0.05}, "raise test_fraction (now 0.05 of each goes to test)"),
        ({"val_fraction": 0.05}, "raise val_fraction (now 0.038 of each goes to val)"),
        ({"val_fraction": 0.97}, "lower val_fraction (now 0.023 of each goes to train)"),
    ],
)
def test_too_small_classes_get_advice_that_fits_the_scarce_split(image_folder, fractions, advice):
    root = image_folder({"a": 6, "b": 6})
    with pytest.raises(DataError, match="Too few images to stratify") as caught:
        build_manifest(_params(root, **fractions))
    assert str(caught.value).endswith(f"add images or {advice}.")
    assert "raise the fractions" not in str(caught.value)
