"""Fine-tuning and checkpoints on a tiny real image folder (random init, 32 px)."""

import json
import shutil
import stat
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_FINETUNE, params_of
from torch.utils.data import DataLoader

from pipeline.config import ExtractParams, FinetuneParams
from pipeline.data.transforms import ImageDataset, eval_transform, target_info
from pipeline.errors import CacheError, CheckpointError, DataError
from pipeline.extract import extract
from pipeline.finetune import class_weights, finetune
from pipeline.models.checkpoint import (
    SIDECAR,
    WEIGHTS,
    load_checkpoint,
    read_record,
    save_checkpoint,
)
from pipeline.storage.image_cache import decode_images
from pipeline.training import DivergedError, predict_logits


def test_checkpoint_describes_itself(tiny_run):
    side = json.loads((tiny_run["checkpoint"] / SIDECAR).read_text())
    assert side["backbone"] == "tf_efficientnet_lite0"
    assert side["class_names"] == list(tiny_run["manifest"].class_names)
    assert side["preprocessing"]["input_size"] == 32 and side["dim"] == 1280
    assert side["manifest_sha256"] == tiny_run["manifest"].sha256
    assert side["params"]["epochs"] == 2 and 1 <= side["best_epoch"] <= 2
    assert set(side["val_metrics"]) == {"accuracy", "f1_macro", "n"}
    assert read_record(tiny_run["checkpoint"]) == tiny_run["result"].record


def test_history_and_metrics(tiny_run):
    result = tiny_run["result"]
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["val_acc"] <= 1 for h in result.history)
    best = max(result.history, key=lambda h: (h["val_acc"], -h["val_loss"]))
    assert result.record.best_epoch == best["epoch"]  # chosen on val, never on test
    assert result.val_metrics["n"] == len(tiny_run["manifest"].indices("val"))
    assert result.test_metrics["n"] == len(tiny_run["manifest"].indices("test"))


def test_loaded_checkpoint_reproduces_the_best_model(tiny_run):
    model, side = load_checkpoint(tiny_run["checkpoint"])
    assert not model.training
    manifest = tiny_run["manifest"]
    val = manifest.indices("val")
    prep = side.preprocessing
    dataset = ImageDataset.from_manifest(manifest, val, eval_transform(prep), 32)
    loader = DataLoader(dataset, batch_size=16)
    logits, labels = predict_logits(model, loader, prep, torch.device("cpu"))
    assert logits.shape == (len(val), 3)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(tiny_run["result"].val_metrics["accuracy"], abs=1e-6)


def test_same_seed_gives_the_same_checkpoint_and_cache_bytes(tiny_run, tmp_path, umask):
    """No clock time in what DVC hashes: a rerun changes neither file, nor the cache."""
    again = finetune(
        tiny_run["manifest"],
        "tf_efficientnet_lite0",
        params_of(FinetuneParams, "finetune", **TINY_FINETUNE),
        tmp_path / "m",
        progress=False,
    )
    assert again.record.weights_sha256 == tiny_run["result"].record.weights_sha256
    for name in (WEIGHTS, SIDECAR):
        assert (tmp_path / "m" / name).read_bytes() == (tiny_run["checkpoint"] / name).read_bytes()
    params = params_of(ExtractParams, "extract", batch_size=16, num_workers=0)
    for ckpt, out in ((tiny_run["checkpoint"], "a.h5"), (tmp_path / "m", "b.h5")):
        extract(tiny_run["manifest"], ckpt, tmp_path / out, params, progress=False)
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in [tmp_path / "m", *(tmp_path / "m").iterdir()]
    }
    assert modes == {"m": 0o755, WEIGHTS: 0o644, SIDECAR: 0o644}  # umask 022


def test_the_image_cache_gives_the_same_checkpoint_and_features_as_decoding(tiny_run, tmp_path):
    """Training and extraction read the squares `defuse decode` wrote instead of the files:
    the same pixels, so the same weights and the same cache bytes."""
    manifest, params = tiny_run["manifest"], params_of(FinetuneParams, "finetune", **TINY_FINETUNE)
    prep = target_info("tf_efficientnet_lite0", params).preprocessing
    images = decode_images(
        manifest, "tf_efficientnet_lite0", prep, tmp_path / "i.h5", 1, False
    ).path
    again = finetune(
        manifest, "tf_efficientnet_lite0", params, tmp_path / "m", progress=False, images=images
    )
    assert again.record.weights_sha256 == tiny_run["result"].record.weights_sha256
    extract_params = params_of(ExtractParams, "extract", batch_size=16, num_workers=0)
    extract(manifest, tiny_run["checkpoint"], tmp_path / "a.h5", extract_params, progress=False)
    extract(manifest, tmp_path / "m", tmp_path / "b.h5", extract_params, False, images=images)
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()

    # With loader workers too, although evaluation then runs in this process (no workers).
    # Every epoch, not only the chosen one: the best may be epoch 1, before any evaluation's
    # draw from the global RNG (a loader's seed) could move epoch 2's dropout.
    workers = replace(params, num_workers=1)
    decoded = finetune(manifest, "tf_efficientnet_lite0", workers, tmp_path / "w1", False)
    cached = finetune(
        manifest, "tf_efficientnet_lite0", workers, tmp_path / "w2", False, images=images
    )
    assert decoded.record.weights_sha256 == cached.record.weights_sha256
    assert _trajectory(decoded) == _trajectory(cached)

    other = replace(params, input_size=48)  # the checkpoint would record other squares
    with pytest.raises(CacheError, match=r"holds squares of input_size 32, but .* input_size 48"):
        finetune(manifest, "tf_efficientnet_lite0", other, tmp_path / "x", False, images=images)
    assert not (tmp_path / "x").exists()


def _trajectory(result) -> list[dict]:
    """The per-epoch history without its wall times."""
    return [{k: v for k, v in row.items() if k != "train_s"} for row in result.history]


def test_tampered_weights_are_refused(tiny_run, tmp_path):
    ckpt = shutil.copytree(tiny_run["checkpoint"], tmp_path / "ckpt")
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(ckpt)


def test_interrupted_save_keeps_the_old_checkpoint(tiny_run, tmp_path):
    ckpt = shutil.copytree(tiny_run["checkpoint"], tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    model, side = load_checkpoint(ckpt)

    class Unserialisable:  # json.dumps fails after the weights were written to the temp folder
        pass

    with pytest.raises(TypeError):
        save_checkpoint(model, ckpt, replace(side, val_metrics={"bad": Unserialisable()}))
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind


def test_class_weights_balance_the_loss():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w[0] * 3 == pytest.approx(w[1] * 1)  # each present class gets the same total weight
    assert w[2] == 0


def test_empty_val_split_is_an_error(tiny_run):
    manifest = tiny_run["manifest"]
    no_val = type(manifest)(
        **{
            **manifest.__dict__,
            "split": tuple("train" if s == "val" else s for s in manifest.split),
        }
    )
    with pytest.raises(DataError, match="val split is empty"):
        finetune(
            no_val,
            "tf_efficientnet_lite0",
            params_of(FinetuneParams, "finetune", **TINY_FINETUNE),
            tiny_run["base"] / "x",
            progress=False,
        )


def test_resize_mode_trains_and_is_recorded(tiny_run, tmp_path):
    params = params_of(
        FinetuneParams, "finetune", **{**TINY_FINETUNE, "epochs": 1}, resize="letterbox"
    )
    finetune(tiny_run["manifest"], "tf_efficientnet_lite0", params, tmp_path / "m", progress=False)
    side = json.loads((tmp_path / "m" / SIDECAR).read_text())
    assert side["preprocessing"]["resize"] == side["params"]["resize"] == "letterbox"
    assert read_record(tmp_path / "m").preprocessing.resize == "letterbox"


def test_a_diverging_fine_tune_stops_naming_where_and_writes_nothing(tiny_run, tmp_path):
    params = params_of(FinetuneParams, "finetune", **{**TINY_FINETUNE, "lr": 1e30})
    with pytest.raises(
        DivergedError, match=r"tf_efficientnet_lite0: the .* at epoch \d+, step \d+"
    ):
        finetune(tiny_run["manifest"], "tf_efficientnet_lite0", params, tmp_path / "m", False)
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary folder
