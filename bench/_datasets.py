"""Manifests the speed benchmarks run on: the default job's ELPV cells, or synthetic
2560x1920 JPEGs (the fusion paper's camera size). Imported by the bench scripts."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import PrepareParams, section
from pipeline.data.manifest import Manifest, build_manifest, read_manifest, write_manifest

JPEG_SIZE = (2560, 1920)
SMOKE_SIZE = (48, 36)  # --smoke runs: images that decode in no time


def _write_jpeg(path: Path, size: tuple[int, int], seed: tuple[int, int]) -> None:
    """A smooth upscaled pattern plus sensor-like noise, which keeps the file camera-sized."""
    rng = np.random.default_rng(seed)
    w, h = size
    cells = (max(1, h // 64), max(1, w // 64), 3)
    coarse = Image.fromarray(rng.integers(60, 200, cells, dtype=np.uint8))
    image = np.asarray(coarse.resize(size, Image.BILINEAR), dtype=np.int16)
    image += rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_jpegs(
    root: Path,
    n: int,
    size: tuple[int, int] = JPEG_SIZE,
    seed: int = 0,
    classes: Sequence[str] = ("defective", "functional"),
) -> Path:
    """``n`` distinct colour JPEGs (quality 90, ~1.3 MB at 2560x1920) dealt in turn into one
    folder per class, written by all cores (each image has its own seed)."""
    paths = [root / classes[i % len(classes)] / f"{i:05d}.jpg" for i in range(n)]
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        seeds = [(seed, i) for i in range(n)]
        list(pool.map(_write_jpeg, paths, [size] * n, seeds, chunksize=max(1, n // 64)))
    return root


def manifest(
    source: str, tmp: Path, n_jpegs: int = 0, size: tuple[int, int] = JPEG_SIZE
) -> Manifest:
    """A manifest of ELPV (``source="elpv"``, 2,624 cells, 4 classes) or of ``n_jpegs``
    synthetic ``size`` JPEGs (``source="jpeg"``, 2 classes), written under ``tmp``."""
    if source == "elpv":
        params = section(PrepareParams, "prepare", source="elpv")  # the default job's splits
    else:
        root = write_jpegs(tmp / "images", n_jpegs, size)
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
