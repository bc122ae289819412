"""Shared fixtures: tiny real image files made in tmp_path."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


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
    from pipeline.data import build_manifest, read_manifest, write_manifest

    params = PrepareParams(source="folder", root=str(root), test_fraction=0.25, val_fraction=0.25)
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
        FinetuneParams(**TINY_FINETUNE),
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
