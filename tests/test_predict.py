"""`predict` on new images: the extraction code and checkpoints the head's caches came from,
the head's calibrated probabilities, a `review` column with a threshold, and clean errors for
outputs it cannot write, bad thresholds and inputs with nothing to classify."""

import csv
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import params_of, review_threshold, write_params

from pipeline import layout
from pipeline.config import ExtractParams, FuseParams
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.extract import extract
from pipeline.fusion.fit import fit_head
from pipeline.fusion.heads import SeedRefits, load_head, save_head
from pipeline.models.checkpoint import SIDECAR, load_checkpoint, read_record, save_checkpoint
from pipeline.predict import predict
from pipeline.predictions import find_images
from pipeline.storage.fused import load_features
from stages.cli import main

BACKBONE = "tf_efficientnet_lite0"
# TTA and float16 shape the features: predict must repeat both to match the cache
EXTRACT = {"batch_size": 8, "num_workers": 0, "tta": True, "dtype": "float16"}
LOGREG = {"C": 1.0, "class_weighted": False, "max_iter": 1000}
MAX_PIXELS = 64_000_000  # prepare.max_pixels


@pytest.fixture(scope="module")
def fused(tiny_run, tmp_path_factory):
    """tiny_run's checkpoint, its cache and a logreg head fitted on it, laid out as a project."""
    base = tmp_path_factory.mktemp("predict")
    models = base / "models"
    shutil.copytree(tiny_run["checkpoint"], layout.checkpoint_dir(BACKBONE, models))
    params = params_of(ExtractParams, "extract", **EXTRACT)
    cache = layout.feature_cache(BACKBONE, base / "features")
    extract(tiny_run["manifest"], layout.checkpoint_dir(BACKBONE, models), cache, params, False)
    features = load_features([cache], [BACKBONE], manifest=tiny_run["manifest"])
    head, sidecar = fit_head(features, "logreg", LOGREG, params_of(FuseParams, "fuse"))
    head.temperature_ = 2.0  # not 1: predict must give the calibrated probabilities
    head_dir = save_head(head, base / "heads" / "logreg", sidecar, seed_refits=SeedRefits(0, (0,)))
    return {"base": base, "models": models, "params": params, "features": features,
            "head_dir": head_dir, "manifest": tiny_run["manifest"]}  # fmt: skip


def test_predict_on_the_test_images_gives_the_heads_probabilities_on_their_cached_rows(fused):
    features, manifest = fused["features"], fused["manifest"]
    test = np.flatnonzero(features.split == "test")
    paths = [manifest.image_path(int(i)) for i in test]
    result = predict(
        paths,
        fused["head_dir"],
        fused["params"],
        fused["models"],
        progress=False,
        max_pixels=MAX_PIXELS,
    )
    head, sidecar = load_head(fused["head_dir"])
    assert (
        sidecar["extraction"][BACKBONE]["checkpoint_sha256"]
        == read_record(layout.checkpoint_dir(BACKBONE, fused["models"])).weights_sha256
    )
    assert result.paths == paths and not result.failures
    np.testing.assert_allclose(result.proba, head.predict_proba(features.X[test]), atol=1e-5)
    raw = head.predict_proba(features.X[test], calibrated=False)
    assert np.abs(result.proba - raw).max() > 1e-3  # the temperature is applied


def _test_images(fused) -> list[Path]:
    test = np.flatnonzero(fused["features"].split == "test")
    return [fused["manifest"].image_path(int(i)) for i in test]


def test_a_review_threshold_flags_exactly_the_images_less_sure_than_it(fused):
    paths = _test_images(fused)
    args = (paths, fused["head_dir"], fused["params"], fused["models"], False)
    plain = predict(*args, max_pixels=MAX_PIXELS)
    assert list(plain.rows()[0]) == ["path", "predicted", "p_clean", "p_crack", "p_scratch"]
    below, n = review_threshold(plain.proba)
    result = predict(*args, max_pixels=MAX_PIXELS, review_below=below)
    least_sure = set(np.argsort(plain.proba.max(axis=1))[:n])
    assert set(np.flatnonzero(result.flagged())) == least_sure
    rows = result.rows()
    assert list(rows[0]) == ["path", "predicted", "review", "p_clean", "p_crack", "p_scratch"]
    assert [i for i, r in enumerate(rows) if r["review"]] == sorted(least_sure)
    assert result.review_summary() == f"; {n} flagged for review (top probability < {below})"


def test_extract_params_other_than_the_caches_are_refused(fused):
    plain = params_of(ExtractParams, "extract", **{**EXTRACT, "tta": False})
    with pytest.raises(ConfigError, match=r"extracted with extract\.tta=True, but the params give"):
        predict(
            [fused["manifest"].image_path(0)],
            fused["head_dir"],
            plain,
            fused["models"],
            max_pixels=MAX_PIXELS,
        )


def test_another_checkpoint_is_refused_before_any_image_is_read(fused, tmp_path):
    models = tmp_path / "models"
    ckpt = shutil.copytree(layout.checkpoint_dir(BACKBONE, fused["models"]), models / BACKBONE)
    model, sidecar = load_checkpoint(ckpt)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # fine-tuned again: other weights, same sidecar
    pinned, now = sidecar.weights_sha256, save_checkpoint(model, ckpt, sidecar).weights_sha256
    assert now != pinned
    (tmp_path / "empty").mkdir()  # nothing to read: the refusal must come first
    with pytest.raises(CheckpointError) as err:
        predict(
            [tmp_path / "empty"], fused["head_dir"], fused["params"], models, max_pixels=MAX_PIXELS
        )
    message = str(err.value)
    assert f"features of {BACKBONE} checkpoint {pinned}, but {ckpt} is checkpoint {now}" in message
    assert f"`defuse extract {BACKBONE}` and `defuse fuse logreg` (or `dvc repro`)" in message


def test_a_head_whose_classes_differ_from_the_checkpoints_is_refused(fused, tmp_path):
    head_dir = shutil.copytree(fused["head_dir"], tmp_path / "head")
    meta = json.loads((head_dir / "head.json").read_text())
    names = meta["class_names"]
    meta["class_names"] = names[::-1]  # same classes, other order: every label would swap
    (head_dir / "head.json").write_text(json.dumps(meta))
    image = fused["manifest"].image_path(0)
    with pytest.raises(CheckpointError, match=r"\(in that order\), but it is used with 3: "):
        predict([image], head_dir, fused["params"], fused["models"], False, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("mean", [0.4, 0.5, 0.5], r"preprocessing differs from the one head .* pinned: mean"),
        ("input_size", 48, r"preprocessing differs from the one head .* pinned: input_size 48"),
        ("resize", "fit", r"preprocessing: resize must be one of"),  # fails validation
    ],
)
def test_an_edited_preprocessing_record_in_model_json_is_refused(
    fused, tmp_path, field, value, says
):
    """model.json is not under the weights' sha256: the head's pinned record catches an edit
    that would otherwise change every answer with exit 0."""
    models = tmp_path / "models"
    ckpt = shutil.copytree(layout.checkpoint_dir(BACKBONE, fused["models"]), models / BACKBONE)
    record = json.loads((ckpt / SIDECAR).read_text())
    record["preprocessing"][field] = value
    (ckpt / SIDECAR).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=says) as err:
        predict(
            [fused["manifest"].image_path(0)],
            fused["head_dir"],
            fused["params"],
            models,
            max_pixels=MAX_PIXELS,
        )
    assert str(ckpt / SIDECAR) in str(err.value) and "\n" not in str(err.value)
    result = _cli(fused, tmp_path, fused["manifest"].image_path(0), "--out", tmp_path / "p.csv",
                  models=models)  # fmt: skip
    assert result.exit_code == 1 and str(ckpt / SIDECAR) in result.output
    assert not (tmp_path / "p.csv").exists()


def test_nothing_to_classify_is_an_error(fused, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"No files under .*empty: nothing to classify"):
        predict(
            [tmp_path / "empty"],
            fused["head_dir"],
            fused["params"],
            fused["models"],
            max_pixels=MAX_PIXELS,
        )
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"None of the 1 file\(s\) .* is a readable image"):
        predict(
            [tmp_path / "notes.txt"],
            fused["head_dir"],
            fused["params"],
            fused["models"],
            max_pixels=MAX_PIXELS,
        )


def _cli(fused, tmp_path, *args, models=None):
    params = write_params(tmp_path / "params.yaml", extract=EXTRACT)
    return CliRunner().invoke(main, [
        "predict", *map(str, args), "--head", "logreg", "--params", str(params),
        "--heads", str(fused["head_dir"].parent), "--models", str(models or fused["models"]),
    ])  # fmt: skip


def test_the_cli_writes_csv_or_json_and_refuses_other_outputs_before_any_work(fused, tmp_path):
    image = fused["manifest"].image_path(0)
    result = _cli(fused, tmp_path, image, "--out", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "p.json").read_text())
    assert rows[0]["path"] == str(image) and set(rows[0]) > {"predicted", "p_crack"}
    assert "review" not in rows[0] and "review" not in result.output  # review.below: null

    absent = tmp_path / "no-models"  # were the checkpoints loaded first, this would be the error
    (tmp_path / "folder").mkdir()
    for out, says in ((tmp_path / "folder", "a folder, not a file; name a file ending in .csv or .json."),
                      (tmp_path / "p.xlsx", "unknown format '.xlsx'; use .csv or .json.")):  # fmt: skip
        result = _cli(fused, tmp_path, image, "--out", out, models=absent)
        assert (result.exit_code, result.output) == (1, f"Error: --out {out}: {says}\n")
    assert not (tmp_path / "p.xlsx").exists()

    (tmp_path / "empty").mkdir()
    result = _cli(fused, tmp_path, tmp_path / "empty", "--out", tmp_path / "p.csv")
    assert result.exit_code == 1 and "nothing to classify" in result.output
    assert not (tmp_path / "p.csv").exists()


def test_the_cli_flags_for_review_in_csv_and_json(fused, tmp_path):
    paths = _test_images(fused)
    args = (paths, fused["head_dir"], fused["params"], fused["models"], False)
    expected = predict(*args, max_pixels=MAX_PIXELS)
    below, n = review_threshold(expected.proba)
    least_sure = np.argsort(expected.proba.max(axis=1))[:n]
    for out in (tmp_path / "p.csv", tmp_path / "p.json"):
        result = _cli(fused, tmp_path, *paths, "--out", out, "--review-below", below)
        assert result.exit_code == 0, result.output
        assert f"; {n} flagged for review (top probability < {below})\n" in result.output
        if out.suffix == ".json":
            flags = [row["review"] for row in json.loads(out.read_text())]
        else:
            with open(out) as fh:
                flags = [row["review"] == "True" for row in csv.DictReader(fh)]
        assert flags == np.isin(np.arange(len(paths)), least_sure).tolist()


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--review-below", "0", "0.0 is not in the range 0<x<=1."),
        ("--review-below", "1.5", "1.5 is not in the range 0<x<=1."),
        ("--batch-size", "0", "0 is not in the range x>=1."),
    ],
)
def test_a_bad_option_is_refused_naming_it_before_any_work(fused, tmp_path, option, value, says):
    absent = tmp_path / "no-models"  # were the checkpoints loaded first, this would be the error
    image = fused["manifest"].image_path(0)
    result = _cli(fused, tmp_path, image, "--out", tmp_path / "p.csv", option, value,
                  models=absent)  # fmt: skip
    assert result.exit_code == 2 and f"Error: Invalid value for '{option}': {says}" in result.output
    assert not (tmp_path / "p.csv").exists()


def test_predict_reads_the_image_cache_for_files_it_holds_and_decodes_the_rest(
    fused, tmp_path, monkeypatch
):
    import pipeline.data.transforms
    import pipeline.predict
    from pipeline.storage.image_cache import decode_images

    manifest = fused["manifest"]
    test = [int(i) for i in np.flatnonzero(fused["features"].split == "test")]
    paths = [manifest.image_path(i) for i in test]
    new = tmp_path / "new.png"  # not in the cache: other bytes
    new.write_bytes(paths[0].read_bytes() + b"\0")
    info = read_record(layout.checkpoint_dir(BACKBONE, fused["models"])).info
    images = tmp_path / "images"
    decode_images(
        manifest, BACKBONE, info.preprocessing, layout.image_cache(BACKBONE, images), 1, False
    )
    decoded = []  # names of the files decoded, by predict's check and by the loader
    for module in (pipeline.predict, pipeline.data.transforms):

        def load_image(path, *args, _real=module.load_image, **kwargs):
            decoded.append(Path(path).name)
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(module, "load_image", load_image)

    args = (fused["head_dir"], fused["params"], fused["models"], False)
    result = predict([*paths, new], *args, images_dir=images, max_pixels=MAX_PIXELS)
    assert decoded == ["new.png", "new.png"]  # the readability check, then the loader
    plain = predict([*paths, new], *args, images_dir=tmp_path / "none", max_pixels=MAX_PIXELS)
    np.testing.assert_allclose(result.proba, plain.proba, atol=1e-6)

    decoded.clear()  # a cache of other squares is passed by: every file is decoded
    other = replace(info.preprocessing, input_size=40)
    decode_images(manifest, BACKBONE, other, layout.image_cache(BACKBONE, images), 1, False)
    predict(paths, *args, images_dir=images, max_pixels=MAX_PIXELS)
    assert sorted(decoded) == sorted([p.name for p in paths] * 2)


def test_inputs_that_are_not_regular_files_are_refused_unopened(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a.png").write_bytes(b"image")
    (tmp_path / "new" / ".hidden").mkdir()
    os.mkfifo(tmp_path / "new" / ".hidden" / "pipe")  # hidden: never listed
    assert find_images([tmp_path / "new"]) == [tmp_path / "new" / "a.png"]
    os.mkfifo(tmp_path / "new" / "pipe.png")
    with pytest.raises(DataError, match=r"new/pipe\.png: cannot read image file: a FIFO"):
        find_images([tmp_path / "new"])
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"zero\.png: cannot read image file: a character device"):
        find_images([tmp_path / "zero.png"])
