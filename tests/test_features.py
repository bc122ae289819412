"""`extract` on a tiny fine-tuned model: rows, determinism, incremental reuse, interruption."""

import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import checkpoint_for, make_manifest, params_of, tinted_folder
from torch.utils.data import DataLoader

from pipeline.config import ExtractParams
from pipeline.data.images import load_image
from pipeline.data.transforms import eval_transform, model_input
from pipeline.errors import DataError
from pipeline.extract import extract
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.registry import embed
from pipeline.storage.feature_cache import read_cache

PARAMS = params_of(ExtractParams, "extract", batch_size=8, num_workers=0)


def test_cache_holds_every_manifest_row_with_the_models_outputs(tiny_run, tmp_path):
    manifest = tiny_run["manifest"]
    result = extract(manifest, tiny_run["checkpoint"], tmp_path / "f.h5", PARAMS, progress=False)
    assert (result.n_rows, result.n_new, result.n_reused) == (len(manifest), len(manifest), 0)
    cache = read_cache(tmp_path / "f.h5")
    assert list(cache.sample_id) == list(manifest.sample_id)
    assert cache.embeddings.shape == (len(manifest), 1280) and cache.logits.shape == (
        len(manifest),
        3,
    )
    assert list(cache.split) == list(manifest.split)
    np.testing.assert_array_equal(cache.label, manifest.label)
    assert cache.attrs["checkpoint_sha256"] == tiny_run["result"].record.weights_sha256
    assert cache.attrs["manifest_sha256"] == manifest.sha256

    model, side = load_checkpoint(tiny_run["checkpoint"])
    prep = side.preprocessing
    image = eval_transform(prep)(load_image(manifest.image_path(5), max_pixels=manifest.max_pixels))
    with torch.inference_mode():
        emb, logits = embed(model, model_input(image[None], prep, torch.device("cpu")))
    np.testing.assert_allclose(cache.embeddings[5], emb[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cache.logits[5], logits[0].numpy(), rtol=1e-4, atol=1e-5)


def test_identical_inputs_give_identical_bytes(tiny_run, tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract(tiny_run["manifest"], tiny_run["checkpoint"], a, PARAMS, progress=False)
    extract(tiny_run["manifest"], tiny_run["checkpoint"], b, PARAMS, progress=False)
    assert a.read_bytes() == b.read_bytes()
    again = extract(tiny_run["manifest"], tiny_run["checkpoint"], a, PARAMS, progress=False)
    assert again.n_new == 0 and a.read_bytes() == b.read_bytes()


def test_extraction_iterates_its_loader_once(tiny_run, tmp_path, monkeypatch):
    """A second iterator would start a worker that decodes batches only to drop them (the
    progress bar of tqdm.auto builds one as it wraps the loader)."""
    built = []
    get_iterator = DataLoader._get_iterator
    monkeypatch.setattr(
        DataLoader, "_get_iterator", lambda self: built.append(self) or get_iterator(self)
    )
    params = replace(PARAMS, num_workers=1)
    extract(tiny_run["manifest"], tiny_run["checkpoint"], tmp_path / "f.h5", params, progress=True)
    assert len(built) == 1


def test_grown_manifest_runs_only_new_rows_and_drops_removed_ones(tiny_run, tmp_path):
    root = shutil.copytree(tiny_run["root"], tmp_path / "images")
    manifest = make_manifest(root, tmp_path / "m1" / "manifest.csv")
    out = tmp_path / "f.h5"
    extract(manifest, tiny_run["checkpoint"], out, PARAMS, progress=False)

    extra = tinted_folder(tmp_path / "extra", {"crack": 3, "scratch": 2}, seed=7)
    for path in extra.rglob("*.png"):
        shutil.copy(path, root / path.parent.name / f"new_{path.name}")
    (root / "clean" / "000.png").unlink()
    grown = make_manifest(root, tmp_path / "m2" / "manifest.csv")
    # extract refuses a checkpoint of another manifest: these are its weights, said to be
    # fine-tuned on the grown one (reuse follows the weights' sha256)
    ckpt = checkpoint_for(tiny_run["checkpoint"], grown, tmp_path / "ckpt")
    result = extract(grown, ckpt, out, PARAMS, progress=False)
    assert result.n_new == 5
    assert result.n_reused == len(manifest) - 1
    assert set(read_cache(out).sample_id) == set(grown.sample_id)

    fresh = tmp_path / "fresh.h5"
    extract(grown, ckpt, fresh, PARAMS, progress=False)
    np.testing.assert_allclose(
        read_cache(out).embeddings, read_cache(fresh).embeddings, rtol=1e-4, atol=1e-5
    )


def test_failed_extraction_leaves_the_previous_cache(tiny_run, tmp_path):
    root = shutil.copytree(tiny_run["root"], tmp_path / "images")
    manifest = make_manifest(root, tmp_path / "manifest.csv")
    out = tmp_path / "f.h5"
    extract(manifest, tiny_run["checkpoint"], out, PARAMS, progress=False)
    before = out.read_bytes()
    victim = manifest.image_path(len(manifest) - 1)
    victim.write_bytes(victim.read_bytes()[:40])  # truncated after prepare: decoding fails late
    with pytest.raises(DataError, match=victim.name):
        extract(
            manifest,
            tiny_run["checkpoint"],
            out,
            replace(PARAMS, tta=True),
            progress=False,
        )
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_tta_averages_flipped_views(tiny_run, tmp_path):
    plain = extract(
        tiny_run["manifest"], tiny_run["checkpoint"], tmp_path / "a.h5", PARAMS, progress=False
    )
    tta = extract(
        tiny_run["manifest"],
        tiny_run["checkpoint"],
        tmp_path / "b.h5",
        replace(PARAMS, tta=True),
        progress=False,
    )
    a, b = read_cache(plain.path), read_cache(tta.path)
    assert b.attrs["tta"] and not a.attrs["tta"]
    assert not np.allclose(a.embeddings, b.embeddings)


def test_cross_fitted_train_rows_come_from_the_fold_that_never_saw_them(tiny_run, tmp_path):
    from conftest import TINY_FINETUNE

    from pipeline import layout
    from pipeline.config import FinetuneParams
    from pipeline.errors import CheckpointError
    from pipeline.finetune import cross_fit_folds, finetune
    from pipeline.storage.fused import load_features

    manifest, ckpt = tiny_run["manifest"], tmp_path / "lite0"
    params = params_of(FinetuneParams, "finetune", **TINY_FINETUNE, cross_fit=2)
    finetune(manifest, "tf_efficientnet_lite0", replace(params, epochs=1), ckpt, progress=False)
    folds = cross_fit_folds(manifest, 2, params.seed)
    assert sorted(np.concatenate(folds)) == sorted(manifest.indices("train"))
    for k, held in enumerate(folds):
        finetune(
            manifest, "tf_efficientnet_lite0", replace(params, epochs=1, seed=k),
            layout.fold_dir(ckpt, k), progress=False, held_out=held,
        )  # fmt: skip

    out = tmp_path / "f.h5"
    extract(manifest, ckpt, out, PARAMS, progress=False)
    cache = read_cache(out)
    assert cache.attrs["cross_fit"] == 2
    for k, held in enumerate(folds):
        assert (cache.fold[held] == k).all()
    assert (cache.fold[cache.split != "train"] == -1).all()
    assert load_features([out], ["tf_efficientnet_lite0"]).out_of_fold.sum() == len(
        manifest.indices("train")
    )

    row = folds[1][0]  # embedded by fold model 1, not by the model trained on all of train
    image = eval_transform(load_checkpoint(ckpt)[1].preprocessing)(
        load_image(manifest.image_path(row), max_pixels=manifest.max_pixels)
    )
    for directory, same in ((layout.fold_dir(ckpt, 1), True), (ckpt, False)):
        model, side = load_checkpoint(directory)
        with torch.inference_mode():
            emb, _ = embed(model, model_input(image[None], side.preprocessing, torch.device("cpu")))
        assert np.allclose(cache.embeddings[row], emb[0].numpy(), atol=1e-5) is same

    shutil.rmtree(layout.fold_dir(ckpt, 1))
    with pytest.raises(CheckpointError, match=r"No checkpoint at .*folds/1"):
        extract(manifest, ckpt, out, PARAMS, progress=False)


def test_extract_brings_images_to_the_square_as_the_checkpoint_says(tiny_run, tmp_path):
    """finetune.resize travels in the sidecar; extract reads it there, not from params."""
    import json
    from dataclasses import replace

    from PIL import Image

    from pipeline.models.checkpoint import SIDECAR

    rng = np.random.default_rng(0)
    for name in tiny_run["manifest"].class_names:
        (tmp_path / "wide" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (24, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "wide" / name / f"{i}.png")
    manifest = make_manifest(tmp_path / "wide", tmp_path / "manifest.csv")
    ckpt = checkpoint_for(tiny_run["checkpoint"], manifest, tmp_path / "lite0")
    sidecar = json.loads((ckpt / SIDECAR).read_text())
    assert sidecar["preprocessing"]["resize"] == "stretch"  # finetune's default, recorded
    sidecar["preprocessing"]["resize"] = "letterbox"
    (ckpt / SIDECAR).write_text(json.dumps(sidecar))
    cache = read_cache(extract(manifest, ckpt, tmp_path / "f.h5", PARAMS, progress=False).path)

    model, side = load_checkpoint(ckpt)
    prep = side.preprocessing
    image = load_image(manifest.image_path(0), max_pixels=manifest.max_pixels)
    for mode, same in (("letterbox", True), ("stretch", False)):
        x = eval_transform(replace(prep, resize=mode))(image)
        with torch.inference_mode():
            emb, _ = embed(model, model_input(x[None], prep, torch.device("cpu")))
        assert np.allclose(cache.embeddings[0], emb[0].numpy(), atol=1e-5) is same


def test_a_checkpoint_fine_tuned_on_another_manifest_is_refused(tiny_run, tmp_path):
    """Another seed re-draws the splits: the old backbone saw some of the new test images."""
    from pipeline.config import PrepareParams
    from pipeline.data.manifest import build_manifest, read_manifest, write_manifest
    from pipeline.errors import CheckpointError

    params = params_of(PrepareParams, "prepare", source="folder", root=str(tiny_run["root"]),
                       test_fraction=0.25, val_fraction=0.25, seed=1)  # fmt: skip
    write_manifest(tmp_path / "manifest.csv", build_manifest(params))
    other = read_manifest(tmp_path / "manifest.csv")
    trained_on = tiny_run["manifest"].sha256
    with pytest.raises(CheckpointError) as err:
        extract(other, tiny_run["checkpoint"], tmp_path / "f.h5", PARAMS, progress=False)
    message, other_sha = str(err.value), other.sha256
    assert (
        f"fine-tuned on manifest {trained_on}, but {other.path} is manifest {other_sha}" in message
    )
    assert "`defuse finetune tf_efficientnet_lite0` on this manifest (or `dvc repro`)" in message
    assert not (tmp_path / "f.h5").exists()


def test_a_corrupt_cache_is_recomputed_and_killed_runs_leftovers_removed(tiny_run, tmp_path):
    from conftest import killed_cache_writer

    out = tmp_path / "f.h5"
    os.replace(killed_cache_writer(out), out)  # the file a killed writer leaves, in its place
    killed_cache_writer(out)  # and a killed run's temporary file beside it
    (tmp_path / ".f.h5.shard-1").write_bytes(b"a killed torchrun's shard")
    result = extract(tiny_run["manifest"], tiny_run["checkpoint"], out, PARAMS, progress=False)
    assert result.n_new == len(tiny_run["manifest"]) and result.n_reused == 0
    assert read_cache(out).embeddings.shape == (len(tiny_run["manifest"]), 1280)
    assert [p.name for p in tmp_path.iterdir()] == ["f.h5"]
