"""Shared fixtures: tiny real image files made in tmp_path, and complete params built from
the project's params.yaml (the library has no defaults to fall back on)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def full_params(**sections) -> dict:
    """The project's params.yaml with ``sections`` laid over it: each given section's keys
    replace its own; `backbones` and `heads` (mappings of entries) are replaced whole."""
    params = yaml.safe_load(REPO_PARAMS.read_text())
    for name, body in sections.items():
        params[name] = body if name in ("backbones", "heads") else {**params[name], **body}
    return params


def write_params(path: Path, **sections) -> Path:
    """A complete params file at ``path``: `full_params(**sections)`."""
    path.write_text(yaml.safe_dump(full_params(**sections), sort_keys=False))
    return path


def params_of(cls, name: str, **overrides):
    """``cls`` built from section ``name`` of the project's params.yaml with ``overrides``."""
    from pipeline.config import from_dict

    return from_dict(cls, full_params(**{name: overrides})[name], name, REPO_PARAMS)


def head_entry(name: str, **overrides) -> dict:
    """Head ``name``'s entry in the project's params.yaml (grids kept), ``overrides`` over it."""
    return {**full_params()["heads"][name], **overrides}


def head_kwargs(name: str, **overrides) -> dict:
    """Every constructor argument of head ``name``, as `defuse fuse` gives them: the first
    grid point of its params.yaml entry, fuse.block_norm, fuse.seed and one block (no
    widths); ``overrides`` laid over."""
    from pipeline.fusion.selection import candidate_params

    fuse = full_params()["fuse"]
    params = candidate_params(name, head_entry(name), [1], fuse["block_norm"], fuse["seed"])[0]
    if "block_dims" in params:
        params["block_dims"] = None
    return params | overrides


@pytest.fixture
def image_folder(tmp_path):
    """Factory: ``make({"a": 6, "b": 6})`` writes root/<class>/<i>.png, every image distinct."""
    rng = np.random.default_rng(0)  # one stream per test, so no two images repeat

    def make(counts: dict[str, int], root: Path | None = None, size: int = 8) -> Path:
        root = root or tmp_path / "images"
        for name, n in counts.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
        return root

    return make


TINY_FINETUNE = {
    "epochs": 2,
    "batch_size": 8,
    "eval_batch_size": 16,
    "pretrained": False,
    "num_workers": 0,
    "input_size": 32,
    "seed": 0,
}


def make_manifest(root: Path, out: Path):
    """Prepare ``root`` (an image folder) into ``out`` and return the read Manifest."""
    from pipeline.config import PrepareParams
    from pipeline.data.manifest import build_manifest, read_manifest, write_manifest

    params = params_of(
        PrepareParams,
        "prepare",
        source="folder",
        root=str(root),
        test_fraction=0.25,
        val_fraction=0.25,
    )
    write_manifest(out, build_manifest(params))
    return read_manifest(out)


def tinted_folder(root: Path, counts: dict[str, int], size: int = 24, seed: int = 0) -> Path:
    """Noisy images whose mean colour depends on the class, so tiny models can learn it."""
    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = np.zeros(3)
            base[k % 3] = 160
            pixels = np.clip(base + rng.normal(60, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


TEST_PREPROCESSING = dict(input_size=32, resize="stretch", mean=(0.5, 0.5, 0.5),
                          std=(0.5, 0.5, 0.5), interpolation="bilinear")  # fmt: skip


def feature_attrs(backbone="b", class_names=("a", "b", "c"), **over) -> dict:
    """`cache_attrs` of a synthetic feature cache (32 px, checkpoint c..c, manifest m..m);
    ``over`` replaces or adds attributes."""
    from pipeline.models.preprocessing import Preprocessing
    from pipeline.storage.feature_cache import cache_attrs

    prep = Preprocessing(**TEST_PREPROCESSING)
    return cache_attrs(backbone, class_names, prep, "c" * 64, "m" * 64) | over


def rewrite_digests(f) -> None:
    """Store the digests of what the open (r+) HDF5 file ``f`` now holds: a test that damages
    a dataset's values this way reaches the checks behind the digest check."""
    from pipeline.storage.rowstore import DIGESTS, digests, encode_attr

    f.attrs[DIGESTS] = encode_attr(
        DIGESTS, digests(f, [k for k in f if k in f.attrs[DIGESTS].decode()])
    )


def killed_cache_writer(path) -> Path:
    """Kill a CacheWriter for ``path`` half-way through; return the file it leaves behind
    (its HDF5 metadata never flushed: h5py raises KeyError on it)."""
    code = (
        "import os, sys, numpy as np\n"
        "from conftest import feature_attrs\n"
        "from pipeline.storage.feature_cache import CacheWriter\n"
        "w = CacheWriter(sys.argv[1], 50, 16, feature_attrs()).__enter__()\n"
        "w.write(0, np.ones((25, 16)), np.ones((25, 3)), [f'{i:064x}' for i in range(25)],\n"
        "        np.arange(25) % 3, ['train'] * 25)\n"
        "os._exit(9)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO_PARAMS.parent}:{Path(__file__).parent}"}
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=env)
    assert done.returncode == 9
    (left,) = Path(path).parent.glob(f".{Path(path).name}.tmp-*")
    return left


def checkpoint_for(src: Path, manifest, dest: Path) -> Path:
    """A copy of checkpoint ``src`` whose sidecar says it was fine-tuned on ``manifest``: the
    same weights (and sha256), so `extract` on either manifest can reuse the other's rows."""
    import json
    import shutil

    from pipeline.models.checkpoint import SIDECAR

    shutil.copytree(src, dest)
    sidecar = json.loads((dest / SIDECAR).read_text())
    (dest / SIDECAR).write_text(json.dumps({**sidecar, "manifest_sha256": manifest.sha256}))
    return dest


def review_threshold(proba: np.ndarray) -> tuple[float, int]:
    """A review.below midway across the widest gap between two top probabilities of ``proba``
    (n_images, n_classes), so that the 1e-4 between the graph's and torch's answers cannot
    move a row across it; and how many rows it flags (the least sure)."""
    tops = np.sort(proba.max(axis=1))
    flagged = int(np.argmax(np.diff(tops))) + 1
    return float(tops[flagged - 1] + tops[flagged]) / 2, flagged


@pytest.fixture
def umask():
    """The umask a test sets with ``umask(0o022)``, restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A prepared 3-class folder and a fine-tuned tf_efficientnet_lite0 (random init, 32 px).

    Session-scoped: tests must not modify these files; copy them first.
    """
    from pipeline.config import FinetuneParams
    from pipeline.finetune import finetune

    base = tmp_path_factory.mktemp("tiny")
    root = tinted_folder(base / "images", {"crack": 12, "scratch": 12, "clean": 12})
    manifest = make_manifest(root, base / "cache" / "manifest.csv")
    result = finetune(
        manifest,
        "tf_efficientnet_lite0",
        params_of(FinetuneParams, "finetune", **TINY_FINETUNE),
        base / "models" / "lite0",
        progress=False,
    )
    return {
        "base": base,
        "root": root,
        "manifest": manifest,
        "checkpoint": base / "models" / "lite0",
        "result": result,
    }


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine OpenMP's spin-waiting makes
    two threads several times slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fused_project(tiny_run, tmp_path_factory):
    """tiny_run's lite0 checkpoint and a random-init lite1 one (same 32 px sidecar), their
    feature caches extracted with TTA in float16, and a logreg head fitted on both (its
    temperature 2), laid out as a project: {"models", "features", "heads", "extract" (params), "manifest"}.

    Session-scoped: tests must not modify these files; copy them first.
    """
    import dataclasses
    import shutil

    from pipeline import layout
    from pipeline.config import ExtractParams, FuseParams
    from pipeline.extract import extract
    from pipeline.fusion.fit import fit_head, fit_seed_refits
    from pipeline.fusion.heads import save_head
    from pipeline.models.checkpoint import read_record, save_checkpoint
    from pipeline.models.registry import create_backbone
    from pipeline.storage.fused import load_features

    base = tmp_path_factory.mktemp("fused")
    models, manifest = base / "models", tiny_run["manifest"]
    shutil.copytree(tiny_run["checkpoint"], layout.checkpoint_dir("tf_efficientnet_lite0", models))
    record = read_record(tiny_run["checkpoint"])
    lite1 = create_backbone("tf_efficientnet_lite1", 3, pretrained=False, quiet=True)
    save_checkpoint(
        lite1,
        layout.checkpoint_dir("tf_efficientnet_lite1", models),
        dataclasses.replace(record, backbone="tf_efficientnet_lite1", weights_sha256=""),
    )
    backbones = ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]
    params = params_of(
        ExtractParams, "extract", batch_size=16, num_workers=0, tta=True, dtype="float16"
    )
    caches = [layout.feature_cache(b, base / "features") for b in backbones]
    for backbone, cache in zip(backbones, caches, strict=True):
        extract(manifest, layout.checkpoint_dir(backbone, models), cache, params, False)
    features = load_features(caches, backbones, manifest=manifest)
    logreg = {"C": 1.0, "class_weighted": False, "max_iter": 1000}
    fuse = params_of(FuseParams, "fuse")
    head, head_sidecar = fit_head(features, "logreg", logreg, fuse)
    head.temperature_ = 2.0  # not 1: the export and predict must both apply it
    refits = fit_seed_refits(features, "logreg", logreg, fuse)  # logreg: its one seed
    save_head(head, layout.head_dir("logreg", base / "heads"), head_sidecar, seed_refits=refits)
    return {"base": base, "models": models, "features": features, "heads": base / "heads",
            "extract": params, "manifest": manifest}  # fmt: skip
