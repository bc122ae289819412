"""Manifests the speed benchmarks run on: the default job's ELPV cells, or synthetic
2560x1920 JPEGs (the fusion paper's camera size). Imported by the bench scripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import PrepareParams, section
from pipeline.data import Manifest, build_manifest, read_manifest, write_manifest

JPEG_SIZE = (2560, 1920)


def write_jpegs(root: Path, n: int, size: tuple[int, int] = JPEG_SIZE, seed: int = 0) -> Path:
    """``n`` distinct colour JPEGs (quality 90, ~1.5 MB at 2560x1920) in two class folders:
    a smooth upscaled pattern plus sensor-like noise, which keeps the files camera-sized."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        folder = root / ("defective", "functional")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(60, 200, (h // 64, w // 64, 3), dtype=np.uint8))
        image = np.asarray(coarse.resize(size, Image.BILINEAR), dtype=np.int16)
        image = np.clip(image + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def manifest(source: str, tmp: Path, n_jpegs: int = 0) -> Manifest:
    """A manifest of ELPV (``source="elpv"``, 2,624 cells, 4 classes) or of ``n_jpegs``
    synthetic JPEGs (``source="jpeg"``, 2 classes), written under ``tmp``."""
    if source == "elpv":
        params = section(PrepareParams, "prepare", source="elpv")  # the default job's splits
    else:
        root = write_jpegs(tmp / "images", n_jpegs)
        params = section(
            PrepareParams,
            "prepare",
            source="folder",
            root=str(root),
            test_fraction=0.2,
            val_fraction=0.2,
        )
    out = tmp / "cache" / "manifest.csv"
    write_manifest(out, build_manifest(params))
    return read_manifest(out)
