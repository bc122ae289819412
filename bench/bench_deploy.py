"""The exported model under the torch-free runtime against `defuse predict`, on the CPU.

Run: .venv/bin/python bench/bench_deploy.py [--images 256] [--repeat 3] [--smoke]
The backbones of params.yaml (the Lite trio at 224 px) as random-weight checkpoints (speed
does not depend on the weights), a logreg head fitted on their features of a few tiny
images, and its export (`defuse export`). Then --images synthetic 300x300 grey PNGs (ELPV's
cells) classified by each, as a user runs them: `pipeline.deploy` (load_export + classify,
numpy + Pillow + onnxruntime) and `pipeline.predict.predict` (checkpoints loaded, every file
decoded, the backbones run by params.yaml's extract.engine, the head), whole calls, each
timing in a fresh process, the two interleaved, best of --repeat. Lines read `deploy <img/s> / predict <img/s> = <ratio>`.
--smoke: one backbone at 32 px, 16 tiny images, one timing in this process: seconds, to
check the code runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _datasets import SMOKE_SIZE, manifest
from _process import runner
from bench_engine import make_checkpoint
from PIL import Image

from pipeline import layout
from pipeline.config import (
    ExtractParams,
    FuseParams,
    PrepareParams,
    backbone_names,
    head_params,
    section,
)
from pipeline.deploy import classify, load_export
from pipeline.engine import engine_for
from pipeline.export import export
from pipeline.extract import extract
from pipeline.fusion.fit import fit_head
from pipeline.fusion.heads import SeedRefits, save_head
from pipeline.predict import predict
from pipeline.storage.fused import load_features

CELL = 300  # an ELPV cell's side


def build(tmp: Path, backbones: list[str], input_size: int | None, params) -> Path:
    """Checkpoints in tmp/models, a logreg head on their features of 16 tiny images in
    tmp/heads/logreg, its export in tmp/export (returned)."""
    data = manifest("jpeg", tmp / "train", 16, SMOKE_SIZE)
    caches = []
    for backbone in backbones:
        checkpoint = layout.checkpoint_dir(backbone, tmp / "models")
        make_checkpoint(backbone, data, checkpoint, input_size)
        caches.append(layout.feature_cache(backbone, tmp / "features"))
        extract(data, checkpoint, caches[-1], params, progress=False)
    fuse = section(FuseParams, "fuse")
    features = load_features(caches, backbones, manifest=data)
    head, sidecar = fit_head(features, "logreg", head_params("logreg"), fuse)
    head_dir = save_head(
        head, tmp / "heads" / "logreg", sidecar, seed_refits=SeedRefits(fuse.seed, (fuse.seed,))
    )
    max_pixels = section(PrepareParams, "prepare").max_pixels
    export(head_dir, tmp / "models", tmp / "export", max_pixels=max_pixels)
    return tmp / "export"


def grey_cells(folder: Path, n: int, side: int) -> Path:
    """``n`` distinct grey ``side`` x ``side`` PNGs in ``folder``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (side, side), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return folder


def timed_deploy(export_dir: Path, images: Path, batch_size: int) -> float:
    start = time.perf_counter()
    result = classify(load_export(export_dir), [images], batch_size)
    return len(result.paths) / (time.perf_counter() - start)


def timed_predict(tmp: Path, images: Path, params) -> float:
    start = time.perf_counter()
    max_pixels = section(PrepareParams, "prepare").max_pixels
    result = predict(
        [images],
        tmp / "heads" / "logreg",
        params,
        tmp / "models",
        progress=False,
        images_dir=tmp / "no-image-caches",
        max_pixels=max_pixels,
    )
    return len(result.paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="best of N timings")
    parser.add_argument("--smoke", action="store_true", help="tiny images, seconds")
    args = parser.parse_args()
    backbones, input_size, side = backbone_names(), None, CELL
    if args.smoke:
        backbones, input_size, side, args.images, args.repeat = backbones[:1], 32, 48, 16, 1
    in_fresh_process = runner(args.smoke)
    params = section(ExtractParams, "extract", device="cpu")  # predict as a user runs it
    engine = engine_for(params.engine, torch.device("cpu"))
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} on "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        tmp = Path(tmp)
        export_dir = build(tmp, backbones, input_size, params)
        images = grey_cells(tmp / "new", args.images, side)
        rates = {"deploy": [], "predict": []}
        for _ in range(args.repeat):  # interleaved
            rates["deploy"].append(
                in_fresh_process(timed_deploy, export_dir, images, params.batch_size)
            )
            rates["predict"].append(in_fresh_process(timed_predict, tmp, images, params))
        best = {way: max(r) for way, r in rates.items()}
        runs = "; ".join(f"{w}: {', '.join(f'{r:.1f}' for r in rs)}" for w, rs in rates.items())
        print(
            f"{args.images} grey {side}x{side} PNGs, {' + '.join(backbones)} + logreg, batch "
            f"{params.batch_size}: deploy (onnxruntime, no torch) {best['deploy']:.1f} img/s / "
            f"predict ({engine} engine) {best['predict']:.1f} img/s = "
            f"{best['deploy'] / best['predict']:.2f} (runs: {runs}); load {os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    main()
