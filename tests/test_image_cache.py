"""Image caches: every image decoded once to its backbone's square; rows equal to what the
loaders make of the files, reused for unchanged samples, refused for another square."""

import re
import shutil
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch
from conftest import feature_attrs, make_manifest, params_of, rewrite_digests
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.config import RESIZE_MODES, FinetuneParams
from pipeline.data.images import load_image
from pipeline.data.transforms import ImageDataset, eval_transform, target_info, train_transform
from pipeline.errors import CacheError, DataError
from pipeline.storage.feature_cache import CacheWriter
from pipeline.storage.image_cache import (
    decode_images,
    image_cache_info,
    is_image_cache,
    open_image_cache,
    read_image_cache,
    usable_image_cache,
    verify_image_cache,
)

BACKBONE = "tf_efficientnet_lite0"
INFO = target_info(BACKBONE, params_of(FinetuneParams, "finetune", input_size=32))


def _at(info, **change):
    """``info`` with its preprocessing record changed."""
    return replace(info, preprocessing=replace(info.preprocessing, **change))


AUGMENT = params_of(
    FinetuneParams, "finetune", hflip=True, vflip=True, rotation=30, color_jitter=0.3
)


def _mixed(root, n_per_class=6, seed=0):
    """Per class: grey PNG, colour JPEG big enough for draft decoding, small colour PNG and
    16-bit grey PNG, all of odd, non-square sizes."""
    rng = np.random.default_rng(seed)
    for name in ("crack", "clean"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            kind, stem = i % 4, root / name / f"{seed}_{i:02d}"
            if kind == 0:
                Image.fromarray(rng.integers(0, 256, (45, 30), np.uint8)).save(f"{stem}.png")
            elif kind == 1:
                pixels = rng.integers(0, 256, (150, 200, 3), np.uint8)
                Image.fromarray(pixels).save(f"{stem}.jpg", quality=90)
            elif kind == 2:
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(f"{stem}.png")
            else:
                Image.fromarray(rng.integers(0, 65536, (20, 24), np.uint16)).save(f"{stem}.png")
    return root


@pytest.fixture
def data(tmp_path):
    root = _mixed(tmp_path / "images")
    return make_manifest(root, tmp_path / "cache" / "manifest.csv")


def _decoded(info, path):
    """(C, S, S) uint8: what the eval loader makes of a file, grey in one channel."""
    p = info.preprocessing
    return eval_transform(p)(load_image(path, max_pixels=10**8, size=p.input_size, keep_gray=True))


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_rows_are_the_squares_the_loaders_make_of_the_files(data, tmp_path, mode):
    info = _at(INFO, resize=mode)
    result = decode_images(
        data, BACKBONE, info.preprocessing, tmp_path / "images.h5", workers=2, progress=False
    )
    assert (result.n_rows, result.n_new, result.n_reused) == (len(data), len(data), 0)
    cache = open_image_cache(result.path, info.preprocessing, BACKBONE)
    assert cache.sample_id.astype(str).tolist() == list(data.sample_id)
    assert cache.attrs["backbone"] == BACKBONE and cache.preprocessing.resize == mode
    squares = cache.manifest_squares(data, np.arange(len(data)))
    for i in range(len(data)):
        expected = _decoded(info, data.image_path(i))
        colour = int(data.rel_path[i][-6:-4]) % 4 in (1, 2)  # _mixed's kinds 1 and 2
        assert squares.channels[i] == len(expected) == (3 if colour else 1)
        assert torch.equal(torch.from_numpy(squares.array(i)).permute(2, 0, 1), expected)


def _batches(dataset, workers, seed=0):
    torch.manual_seed(seed)
    return [b[0] for b in DataLoader(dataset, batch_size=4, num_workers=workers)]


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_the_loaders_yield_the_same_tensors_with_and_without_the_cache(data, tmp_path, mode):
    info = _at(INFO, resize=mode)
    path = decode_images(data, BACKBONE, info.preprocessing, tmp_path / "i.h5", 1, False).path
    cache = open_image_cache(path, info.preprocessing, BACKBONE)
    rows = np.random.default_rng(1).permutation(len(data))  # any order, as a split gives
    squares = cache.manifest_squares(data, rows)
    for transform in (
        eval_transform(info.preprocessing),
        train_transform(info.preprocessing, AUGMENT),
    ):
        files = ImageDataset.from_manifest(data, rows, transform, 32)
        cached = ImageDataset.from_manifest(data, rows, transform, 32, squares)
        for a, b in zip(_batches(files, 0), _batches(cached, 0), strict=True):
            assert torch.equal(a, b)
    # Loader workers open the file themselves, even when this process already has it open.
    assert squares.image(0) is not None
    files = ImageDataset.from_manifest(data, rows, train_transform(info.preprocessing, AUGMENT), 32)
    cached = ImageDataset.from_manifest(
        data, rows, train_transform(info.preprocessing, AUGMENT), 32, squares
    )
    for a, b in zip(_batches(files, 2), _batches(cached, 2), strict=True):
        assert torch.equal(a, b)


def test_unchanged_samples_are_copied_not_decoded(tmp_path):
    root = _mixed(tmp_path / "images")
    first = make_manifest(root, tmp_path / "m1" / "manifest.csv")
    out = tmp_path / "images.h5"
    decode_images(first, BACKBONE, INFO.preprocessing, out, 2, False)
    _mixed(root, n_per_class=3, seed=1)  # new images
    gone = first.image_path(0)
    kept = first.image_path(1)
    gone.unlink()
    grown = make_manifest(root, tmp_path / "m2" / "manifest.csv")
    shutil.move(kept, tmp_path / "aside")  # a copied row needs no file
    result = decode_images(grown, BACKBONE, INFO.preprocessing, out, 2, False)
    assert (result.n_new, result.n_reused) == (6, len(first) - 1)
    assert read_image_cache(out).sample_id.astype(str).tolist() == list(grown.sample_id)

    shutil.move(tmp_path / "aside", kept)
    fresh = decode_images(grown, BACKBONE, INFO.preprocessing, tmp_path / "fresh.h5", 1, False)
    assert fresh.path.read_bytes() == out.read_bytes()


def test_identical_inputs_give_identical_bytes_and_another_square_decodes_again(data, tmp_path):
    a = decode_images(data, BACKBONE, INFO.preprocessing, tmp_path / "a.h5", 2, False).path
    b = decode_images(data, BACKBONE, INFO.preprocessing, tmp_path / "b.h5", 1, False).path
    assert a.read_bytes() == b.read_bytes()
    again = decode_images(data, BACKBONE, INFO.preprocessing, a, 2, False)
    assert again.n_reused == len(data) and a.read_bytes() == b.read_bytes()
    other = decode_images(data, BACKBONE, _at(INFO, input_size=40).preprocessing, a, 2, False)
    assert other.n_reused == 0 and read_image_cache(a).preprocessing.input_size == 40


def test_a_cache_of_another_square_is_refused_and_predict_passes_it_by(data, tmp_path):
    path = decode_images(data, BACKBONE, INFO.preprocessing, tmp_path / "images.h5", 1, False).path
    for change, says in (
        ({"input_size": 48}, "holds squares of input_size 32, but tf_efficientnet_lite0 is "
                             "fine-tuned on input_size 48"),
        ({"resize": "letterbox"}, "resize 'stretch', but .* resize 'letterbox'"),
    ):  # fmt: skip
        other = _at(INFO, **change)
        with pytest.raises(CacheError, match=rf"{says}; re-run `defuse decode {BACKBONE}`"):
            open_image_cache(path, other.preprocessing, BACKBONE)
        assert usable_image_cache(path, other.preprocessing) is None
    assert usable_image_cache(tmp_path / "absent.h5", INFO.preprocessing) is None
    assert usable_image_cache(path, INFO.preprocessing) is not None
    with pytest.raises(CacheError, match=r"absent\.h5: no such image cache"):
        open_image_cache(tmp_path / "absent.h5", INFO.preprocessing, BACKBONE)


def test_images_the_cache_lacks_are_named(tmp_path):
    root = _mixed(tmp_path / "images")
    first = make_manifest(root, tmp_path / "m1" / "manifest.csv")
    path = decode_images(first, BACKBONE, INFO.preprocessing, tmp_path / "images.h5", 1, False).path
    _mixed(root, n_per_class=3, seed=1)
    grown = make_manifest(root, tmp_path / "m2" / "manifest.csv")
    new = [i for i, s in enumerate(grown.sample_id) if s not in first.sample_id]
    cache = open_image_cache(path, INFO.preprocessing, BACKBONE)
    with pytest.raises(CacheError) as err:
        cache.manifest_squares(grown, np.arange(len(grown)))
    message = str(err.value)
    assert f"has no row for {len(new)} of the {len(grown)} images" in message
    assert f"sample {grown.sample_id[new[0]]} ({grown.rel_path[new[0]]})" in message
    squares = cache.squares(grown.sample_id)  # predict's view: the rest is decoded
    assert (squares.rows[new] == -1).all() and squares.image(new[0]) is None
    assert verify_image_cache(path, first) == []
    assert "has no row for" in verify_image_cache(path, grown)[0]


def test_a_file_changed_since_prepare_is_refused(data, tmp_path):
    victim = data.image_path(2)
    Image.new("RGB", (50, 40), (9, 9, 9)).save(victim)
    with pytest.raises(
        DataError, match=rf"{victim.name}: its bytes no longer hash to its sample_id"
    ):
        decode_images(data, BACKBONE, INFO.preprocessing, tmp_path / "images.h5", 1, False)
    assert not (tmp_path / "images.h5").exists()


def test_damaged_or_foreign_files_are_errors_and_never_reused(data, tmp_path):
    path = decode_images(data, BACKBONE, INFO.preprocessing, tmp_path / "images.h5", 1, False).path
    info = image_cache_info(path)
    assert info["shape"] == (len(data), 32, 32, 3) and info["images"]["grey"] == len(data) // 2
    assert is_image_cache(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not is_image_cache(path)
    with pytest.raises(CacheError, match="not a readable HDF5 file"):
        read_image_cache(path)
    assert "not a readable HDF5 file" in verify_image_cache(path)[0]
    assert (
        decode_images(data, BACKBONE, INFO.preprocessing, path, 1, False).n_reused == 0
    )  # recomputed whole

    features = tmp_path / "features.h5"  # a sound feature cache is no image cache
    with CacheWriter(features, 2, 4, feature_attrs(class_names=["a", "b"])) as writer:
        writer.write(0, np.ones((2, 4)), np.ones((2, 2)), ["a" * 64, "b" * 64], [0, 1], [0, 1])
    assert not is_image_cache(features)
    with pytest.raises(
        CacheError,
        match="image_schema None is not 2; not a defuse image cache of this version: re-run `defuse decode b`",
    ):
        read_image_cache(features)


def test_readers_refuse_a_file_replaced_after_its_header_was_read(data, tmp_path):
    path = decode_images(data, BACKBONE, INFO.preprocessing, tmp_path / "images.h5", 1, False).path
    squares = open_image_cache(path, INFO.preprocessing, BACKBONE).manifest_squares(
        data, np.arange(len(data))
    )
    decode_images(data, BACKBONE, _at(INFO, input_size=40).preprocessing, path, 1, False)
    with pytest.raises(CacheError, match="changed since it was read"):
        squares.image(0)


def _swap_ids(f):
    ids = f["sample_id"][()]
    f["sample_id"][0], f["sample_id"][1] = ids[1], ids[0]


def _change_pixel_row(f):
    f["pixels"][3, 5] = 255 - f["pixels"][3, 5]


@pytest.mark.parametrize(
    ("damage", "dataset"), [(_swap_ids, "sample_id"), (_change_pixel_row, "pixels")]
)
def test_tampered_rows_are_refused_by_every_reader_and_never_reused(
    data, tmp_path, damage, dataset
):
    path = decode_images(data, BACKBONE, INFO.preprocessing, tmp_path / "images.h5", 1, False).path
    with h5py.File(path, "r+") as f:
        damage(f)
    says = f"{path}: dataset '{dataset}' does not match its stored sha256 digest"
    (problem,) = verify_image_cache(path, data)
    assert problem.startswith(says) and "\n" not in problem
    with pytest.raises(CacheError, match=re.escape(says)):  # what finetune / extract / predict do
        open_image_cache(path, INFO.preprocessing, BACKBONE).manifest_squares(
            data, np.arange(len(data))
        )
    result = decode_images(data, BACKBONE, INFO.preprocessing, path, 1, False)
    assert result.n_reused == 0 and verify_image_cache(path, data) == []
    # the digests cover what a reader compares: rewritten digests make the file sound again
    with h5py.File(path, "r+") as f:
        damage(f)
        rewrite_digests(f)
    assert verify_image_cache(path) == []
