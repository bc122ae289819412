"""Pictures of the errors: Grad-CAM on a model whose evidence sits where we put it, and the
gallery `defuse evaluate` writes on a tiny project whose head cannot help making errors."""

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import checkpoint_for, head_entry, make_manifest, write_params
from PIL import Image
from scipy.special import softmax
from torch import nn

from pipeline import layout
from pipeline.data.manifest import read_manifest
from pipeline.fusion.fit import evaluate, fused_features
from pipeline.report.explain import gallery, grad_cam
from stages.cli import main

BACKBONE = "tf_efficientnet_lite0"


class _ColourSpots(nn.Module):
    """timm's interface on two channels: red (channel 0) and blue (channel 2) evidence on a
    4x-coarser map; class k's logit is the mean of channel k, so the class decides where."""

    def forward_features(self, x):
        return nn.functional.avg_pool2d(torch.relu(x[:, [0, 2]]), 4)

    def forward_head(self, x, pre_logits=False):
        return x.mean((2, 3))

    def get_classifier(self):
        return nn.Identity()


def test_grad_cam_lights_the_region_that_gives_the_class_its_logit():
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, 4:12, 20:28] = 1.0  # a red square top right
    x[0, 2, 20:28, 0:8] = 2.0  # a brighter blue one bottom left
    model = _ColourSpots()
    for cls, (rows, cols) in (
        (0, (slice(4, 12), slice(20, 28))),
        (1, (slice(20, 28), slice(0, 8))),
    ):
        heat, prob = grad_cam(model, x, torch.tensor([cls]))
        assert heat.shape == (1, 32, 32) and float(heat.max()) == pytest.approx(1.0)
        r, c = np.unravel_index(int(heat[0].argmax()), (32, 32))
        assert rows.start <= r < rows.stop and cols.start <= c < cols.stop, (cls, r, c)
        inside = np.zeros((32, 32), bool)
        inside[rows, cols] = True
        assert heat[0][torch.from_numpy(~inside)].max() < 0.6  # the other square stays cool
        expected = softmax(model.forward_head(model.forward_features(x)).numpy(), 1)[0, cls]
        assert float(prob[0]) == pytest.approx(expected, rel=1e-5)


def test_grad_cam_works_where_gradients_are_off():
    x = torch.zeros(2, 3, 32, 32)
    x[:, 0, :8, :8] = 1.0
    x[:, 2, 8:16, 8:16] = 1.0
    with torch.no_grad():  # a caller with gradients off
        heat, _ = grad_cam(_ColourSpots(), x, torch.tensor([0, 1]))
    assert heat[0, :8, :8].mean() > heat[0, 16:, 16:].mean()


@pytest.fixture(scope="module")
def project(tiny_run, tmp_path_factory):
    """A finished tiny project on pure-noise images (the head has to err on test): manifest,
    tiny_run's weights as its checkpoint, the feature cache and a logreg head, in its folder."""
    base = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    for name in ("crack", "scratch", "clean"):  # tiny_run's classes, so its weights fit
        (base / "images" / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # not square
            Image.fromarray(pixels).save(base / "images" / name / f"{i:03d}.png")
    manifest = make_manifest(base / "images", base / layout.MANIFEST)
    checkpoint_for(tiny_run["checkpoint"], manifest, base / layout.checkpoint_dir(BACKBONE))
    write_params(
        base / "params.yaml",
        backbones={BACKBONE: {"input_size": 32}},
        extract={"batch_size": 16, "num_workers": 0},
        fuse={"seeds": [0]},
        heads={"logreg": head_entry("logreg", C=1.0)},
        evaluate={"final_head": "logreg", "gallery": 3, "device": "cpu"},
        review={"defect_free": None},
    )
    with contextlib.chdir(base):
        for args in (["extract", BACKBONE], ["fuse", "logreg"]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, (args, result.output)
    return base


def _evaluate(project, *args):
    with contextlib.chdir(project):
        return CliRunner().invoke(main, ["evaluate", *args])


def _results(project):
    manifest = read_manifest(project / layout.MANIFEST)
    features = fused_features(manifest, project / layout.FEATURES, project / "params.yaml")
    results = evaluate(features, {"logreg": project / layout.head_dir("logreg")})
    return manifest, features, results


def test_gallery_shows_the_most_confident_errors_first_up_to_the_cap(project):
    manifest, features, results = _results(project)
    result = dict(results["logreg"])
    n = len(result["y_true"])
    # four errors with known probabilities; the rest right
    result["y_pred"] = result["y_true"].copy()
    wrong = np.arange(4)
    result["y_pred"][wrong] = (result["y_true"][wrong] + 1) % 3
    result["p_pred"] = np.full(n, 0.9)
    result["p_pred"][wrong] = [0.5, 0.8, 0.4, 0.7]
    shown = gallery(manifest, features, result, "logreg", 2, project / layout.MODELS, device="cpu")
    assert shown.n_errors == 4 and len(shown.names) == 2 == len(shown.thumbnails)
    np.testing.assert_allclose(shown.prob, [0.8, 0.7])
    test = np.flatnonzero(features.split == "test")
    row = {sid: i for i, sid in enumerate(manifest.sample_id)}
    expected = [manifest.image_path(row[features.sample_id[test[k]]]).name for k in (1, 3)]
    assert list(shown.names) == expected
    np.testing.assert_array_equal(shown.pred, result["y_pred"][[1, 3]])

    cam = shown.cams[BACKBONE]
    assert cam.images.shape == (2, 32, 32, 3) and cam.images.dtype == np.uint8
    assert cam.heat.shape == (2, 32, 32) and cam.heat.min() >= 0 and cam.heat.max() <= 1
    # preprocessed exactly as extract: the probabilities are the cached logits' softmax
    logits = features.logits[0][test[[1, 3]]]
    expected = softmax(logits.astype(np.float64), 1)[[0, 1], shown.pred]
    np.testing.assert_allclose(cam.prob, expected, rtol=1e-4)
    assert shown.skipped == {}


def test_evaluate_writes_the_gallery_and_grad_cam_and_links_them(project, tmp_path):
    result = _evaluate(project, "--reports", str(tmp_path / "reports"))
    assert result.exit_code == 0, result.output
    folder = tmp_path / "reports" / "gallery"
    assert sorted(p.name for p in folder.iterdir()) == ["errors.png", f"gradcam_{BACKBONE}.png"]
    for png in folder.iterdir():
        with Image.open(png) as image:
            assert image.width > 300 and image.height > 300
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "## Pictures of the errors (`logreg`, test split)" in summary
    assert "![errors](gallery/errors.png)" in summary
    assert f"![gradcam_{BACKBONE}](gallery/gradcam_{BACKBONE}.png)" in summary
    n_errors = json.loads((tmp_path / "reports/metrics/test_details.json").read_text())
    n_test = n_errors["logreg"]["n"]
    wrong = round(n_test * (1 - n_errors["logreg"]["accuracy"]))
    assert wrong >= 3  # noise: the cap (evaluate.gallery: 3) is what limits the gallery
    assert f"`logreg` on the {n_test} test images: 3 of its {wrong} errors, the most" in summary
    assert "Grad-CAM skipped" not in result.output


def test_missing_checkpoints_skip_grad_cam_and_say_so(project, tmp_path):
    reports = tmp_path / "reports"
    models = tmp_path / "no-models"
    result = _evaluate(project, "--reports", str(reports), "--models", str(models))
    assert result.exit_code == 0, result.output
    said = f"Grad-CAM skipped for {BACKBONE}: No checkpoint at {models / BACKBONE}"
    assert said in result.stderr
    summary = (reports / "summary.md").read_text()
    assert f"**Grad-CAM skipped for `{BACKBONE}`**: No checkpoint at {models / BACKBONE}" in summary
    assert [p.name for p in (reports / "gallery").iterdir()] == ["errors.png"]
    assert (reports / "metrics" / "test.json").is_file() and (reports / "figures").is_dir()


def test_a_checkpoint_other_than_the_extracted_one_is_skipped(project, tmp_path):
    from pipeline.models.checkpoint import load_checkpoint, save_checkpoint

    model, sidecar = load_checkpoint(project / layout.checkpoint_dir(BACKBONE))
    with torch.no_grad():
        model.get_classifier().bias += 1.0  # retrained since the cache was written
    save_checkpoint(model, layout.checkpoint_dir(BACKBONE, tmp_path), sidecar)
    manifest, features, results = _results(project)
    shown = gallery(manifest, features, results["logreg"], "logreg", 2, tmp_path, device="cpu")
    assert shown.cams == {} and "was extracted with" in shown.skipped[BACKBONE]
    assert "defuse extract" in shown.skipped[BACKBONE] and len(shown.names) == 2


def test_gallery_off_leaves_an_empty_folder_and_no_section(project, tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(project / "params.yaml", params)
    params.write_text(params.read_text().replace("gallery: 3", "gallery: 0"))
    reports = tmp_path / "reports"
    result = _evaluate(project, "--reports", str(reports), "--params", str(params))
    assert result.exit_code == 0, result.output
    assert list((reports / "gallery").iterdir()) == []
    assert "Pictures of the errors" not in (reports / "summary.md").read_text()
