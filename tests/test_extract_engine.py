"""extract.engine: onnxruntime embeds as torch does (within 1e-4), is recorded in the cache
and pinned by the head; a graph that disagrees with torch on the first batch writes nothing."""

import io
import shutil
from dataclasses import replace

import h5py
import numpy as np
import onnx
import pytest
import torch
from conftest import params_of
from timm.layers import Conv2dSame

from pipeline import engine, layout
from pipeline.config import ExtractParams, FuseParams
from pipeline.errors import CheckpointError, ConfigError
from pipeline.extract import extract
from pipeline.fusion.fit import fit_head
from pipeline.fusion.heads import SeedRefits, load_head, save_head
from pipeline.models.registry import backbone_info, create_backbone
from pipeline.predict import predict
from pipeline.storage.feature_cache import read_cache
from pipeline.storage.fused import load_features

BACKBONE = "tf_efficientnet_lite0"
TORCH = params_of(ExtractParams, "extract", batch_size=8, num_workers=0, engine="torch")
ORT = replace(TORCH, engine="onnxruntime")
MAX_PIXELS = 64_000_000  # prepare.max_pixels


@pytest.fixture(scope="module")
def caches(tiny_run, tmp_path_factory, one_thread):
    """tiny_run's checkpoint extracted by each engine: {"torch": path, "onnxruntime": path}."""
    base = tmp_path_factory.mktemp("engines")
    out = {}
    for params in (TORCH, ORT):
        out[params.engine] = base / f"{params.engine}.h5"
        extract(tiny_run["manifest"], tiny_run["checkpoint"], out[params.engine], params, False)
    return out


def test_each_engine_gives_the_same_embeddings_and_logits(caches):
    a, b = read_cache(caches["torch"]), read_cache(caches["onnxruntime"])
    assert list(a.sample_id) == list(b.sample_id)
    np.testing.assert_allclose(b.embeddings, a.embeddings, rtol=0, atol=1e-4)
    np.testing.assert_allclose(b.logits, a.logits, rtol=0, atol=1e-4)


def test_the_cache_records_its_engine_and_a_torch_one_keeps_its_bytes(caches):
    assert read_cache(caches["onnxruntime"]).attrs["engine"] == "onnxruntime"
    assert read_cache(caches["torch"]).attrs["engine"] == "torch"
    with h5py.File(caches["torch"]) as f:  # torch: as before the engine existed, same bytes
        assert "engine" not in f.attrs
    with h5py.File(caches["onnxruntime"]) as f:
        assert "onnxruntime" in f.attrs["versions"].decode()


def test_rows_of_another_engine_are_computed_again(tiny_run, caches, tmp_path):
    out = shutil.copy(caches["torch"], tmp_path / "f.h5")
    n = len(tiny_run["manifest"])
    assert extract(tiny_run["manifest"], tiny_run["checkpoint"], out, ORT, False).n_new == n
    assert read_cache(out).attrs["engine"] == "onnxruntime"
    again = extract(tiny_run["manifest"], tiny_run["checkpoint"], out, ORT, False)
    assert (again.n_new, again.n_reused) == (0, n)


def test_a_graph_that_disagrees_with_torch_writes_nothing(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "TOLERANCE", -1.0)  # no difference is small enough
    out = tmp_path / "f.h5"
    with pytest.raises(CheckpointError, match=r"differ from torch's by .* on the first batch"):
        extract(tiny_run["manifest"], tiny_run["checkpoint"], out, ORT, False)
    assert list(tmp_path.iterdir()) == []


def test_the_graph_pads_by_constants_and_the_model_is_left_as_it_was():
    # TF 'SAME' padding read from the input's shape kept onnxruntime at 0.7x its speed
    model = create_backbone(BACKBONE, 3, pretrained=False, quiet=True)
    net = engine.PixelBackbone(model, backbone_info(BACKBONE, 32).preprocessing, tta=False)
    graph, example = io.BytesIO(), torch.zeros((2, 32, 32, 3), dtype=torch.uint8)
    engine.write_onnx(net, (example,), ["pixels"], ["embeddings", "logits"], graph)
    ops = {node.op_type for node in onnx.load_from_string(graph.getvalue()).graph.node}
    assert "Pad" in ops and "Shape" not in ops
    assert sum(isinstance(m, Conv2dSame) for m in model.modules()) == 5  # stem + 4 strided


def test_onnxruntime_on_cuda_is_refused_naming_extract_engine():
    with pytest.raises(ConfigError, match=r"extract\.engine 'onnxruntime' runs on the CPU"):
        replace(ORT, device="cuda")
    with pytest.raises(ConfigError, match=r"extract\.engine"):  # device auto, resolved to cuda
        engine.engine_for("onnxruntime", torch.device("cuda"))
    assert engine.engine_for("torch", torch.device("cuda")) == "torch"
    with pytest.raises(ConfigError, match=r"'extract\.engine' parameter must be one of"):
        replace(ORT, engine="openvino")


def test_auto_is_onnxruntime_on_the_cpu_torch_on_cuda_and_the_pinned_engine_for_predict():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [engine.engine_for("auto", d) for d in (cpu, cuda)] == ["onnxruntime", "torch"]
    assert engine.engine_for("auto", cpu, pinned="torch") == "torch"  # a GPU-made head's
    with pytest.raises(ConfigError, match=r"'onnxruntime' runs on the CPU only, but the device"):
        engine.engine_for("auto", cuda, pinned="onnxruntime")


def test_auto_extracts_with_onnxruntime_on_the_cpu(tiny_run, caches, tmp_path):
    out = shutil.copy(caches["onnxruntime"], tmp_path / "f.h5")
    auto = replace(TORCH, engine="auto")
    reused = extract(tiny_run["manifest"], tiny_run["checkpoint"], out, auto, False)
    assert reused.n_new == 0 and read_cache(out).attrs["engine"] == "onnxruntime"


def test_predict_repeats_the_heads_engine_and_refuses_another(tiny_run, caches, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_run["checkpoint"], layout.checkpoint_dir(BACKBONE, models))
    features = load_features([caches["onnxruntime"]], [BACKBONE], manifest=tiny_run["manifest"])
    assert features.extraction[BACKBONE]["engine"] == "onnxruntime"
    head, sidecar = fit_head(
        features, "logreg", {"C": 1.0, "class_weighted": False, "max_iter": 1000},
        params_of(FuseParams, "fuse"),
    )  # fmt: skip
    head_dir = save_head(head, tmp_path / "logreg", sidecar, seed_refits=SeedRefits(0, (0,)))
    test = np.flatnonzero(features.split == "test")
    paths = [tiny_run["manifest"].image_path(int(i)) for i in test]
    result = predict(paths, head_dir, ORT, models, progress=False, max_pixels=MAX_PIXELS)
    expected = load_head(head_dir)[0].predict_proba(features.X[test])
    np.testing.assert_allclose(result.proba, expected, atol=1e-5)
    with pytest.raises(ConfigError, match=r"extract\.engine='onnxruntime', but the params give"):
        predict(paths, head_dir, TORCH, models, progress=False, max_pixels=MAX_PIXELS)
    auto = predict(paths, head_dir, replace(ORT, engine="auto"), models, progress=False,
                   max_pixels=MAX_PIXELS)  # fmt: skip
    np.testing.assert_array_equal(auto.proba, result.proba)
