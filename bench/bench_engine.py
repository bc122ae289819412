"""Extraction with each engine (extract.engine): onnxruntime against torch, on the CPU.

Run: .venv/bin/python bench/bench_engine.py [--images 512] [--repeat 3] [--smoke]
For each backbone of params.yaml (the Lite trio, at their params.yaml size, 224 px), a
random-weight checkpoint (speed does not depend on the weights) and --images synthetic
300x300 JPEGs (ELPV's cell size) decoded once into its image cache, the layout
`defuse decode` writes and `defuse extract` reads. Then the whole `extract()` call with each
engine: read the squares, run the backbone, write the cache; for onnxruntime also building
its graph and checking the first batch's first rows against torch, which a real run pays
once per backbone too. Batch extract.batch_size, extract.num_workers loader workers, device cpu;
each timing in a fresh process (`_process.py`), the engines interleaved so that a slow
spell of a shared machine hits both, the best of --repeat kept. Lines read
`<backbone>: onnxruntime <img/s> / torch <img/s> = <ratio>`. Beside it, timed in a process
of its own: the graph's one-time build (export, session, the first batch and its check),
onnxruntime's whole-extract rate net of it (what a larger job tends to), and the bare
forward of each engine on batches in memory, the ceiling of the ratio; then torch's bare
forward under glibc's default allocator (`runtime.keep_freed_memory` not called), what
torch gives without the policy every defuse process runs with.
--smoke: one backbone at 32 px, 16 tiny images, one timing in this process: seconds, to
check the code runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _datasets import SMOKE_SIZE, manifest
from _process import runner
from bench_extract import untrained_record

from pipeline.config import ExtractParams, backbone_names, finetune_params, section
from pipeline.data.transforms import target_info
from pipeline.engine import OnnxBackbone, PixelBackbone
from pipeline.extract import extract
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint
from pipeline.models.registry import create_backbone
from pipeline.runtime import prepare_model
from pipeline.storage.image_cache import decode_images

ENGINES = ("torch", "onnxruntime")
CELL_SIZE = (300, 300)  # an ELPV cell


def make_checkpoint(backbone: str, data, directory: Path, input_size: int | None) -> None:
    """A random-weight checkpoint of ``data``'s classes at ``backbone``'s params.yaml size
    (``input_size`` overrides it)."""
    params = finetune_params(backbone)
    info = target_info(
        backbone, dataclasses.replace(params, input_size=input_size or params.input_size)
    )
    model = create_backbone(backbone, len(data.class_names), pretrained=False, quiet=True)
    save_checkpoint(model, directory, untrained_record(info, data.class_names, data.sha256))


def timed_extract(data, checkpoint: Path, images: Path, out: Path, params) -> float:
    """Images/s of the whole `extract` call reading the image cache ``images``."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    extract(data, checkpoint, out, params, progress=False, images=images)
    return len(data) / (time.perf_counter() - start)


def _pixels(size: int, batch_size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), np.uint8)


def _rate(forward, pixels: np.ndarray, batches: int) -> float:
    """Images/s of ``forward`` over ``batches`` calls on ``pixels``, after one to warm up."""
    forward(pixels)
    start = time.perf_counter()
    for _ in range(batches):
        forward(pixels)
    return batches * len(pixels) / (time.perf_counter() - start)


def torch_rate(checkpoint: Path, batch_size: int, batches: int) -> float:
    """The bare forward's img/s in torch as extract runs it, on random batches in memory."""
    model, record = load_checkpoint(checkpoint)
    net = PixelBackbone(prepare_model(model, torch.device("cpu")), record.preprocessing, False)

    def forward(batch):
        with torch.inference_mode():
            return net(torch.from_numpy(batch))

    return _rate(forward, _pixels(record.preprocessing.input_size, batch_size), batches)


def timed_engines(checkpoint: Path, batch_size: int, batches: int) -> tuple[float, ...]:
    """Seconds the onnxruntime engine takes before its second batch (the graph exported and
    loaded, its first batch run and checked against torch), then the bare forward's img/s
    with each engine (onnxruntime, torch as extract runs it) over ``batches`` random batches
    in memory: the most a whole extract can gain."""
    model, record = load_checkpoint(checkpoint)
    pixels = _pixels(record.preprocessing.input_size, batch_size)
    start = time.perf_counter()
    onnx = OnnxBackbone(model, record.preprocessing, False, record.backbone)
    onnx(pixels)
    build = time.perf_counter() - start
    return build, _rate(onnx, pixels, batches), torch_rate(checkpoint, batch_size, batches)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=512)
    defaults = section(ExtractParams, "extract")  # what `defuse extract` runs with
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--repeat", type=int, default=3, help="best of N timings")
    parser.add_argument("--smoke", action="store_true", help="tiny images, seconds")
    args = parser.parse_args()
    backbones, input_size, size = backbone_names(), None, CELL_SIZE
    if args.smoke:
        backbones, input_size, size = backbones[:1], 32, SMOKE_SIZE
        args.images, args.repeat, args.batch_size, args.num_workers = 16, 1, 8, 0
    in_fresh_process = runner(args.smoke)
    params = {
        engine: section(
            ExtractParams, "extract", batch_size=args.batch_size,
            num_workers=args.num_workers, device="cpu", engine=engine,
        )
        for engine in ENGINES
    }  # fmt: skip
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} on "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        tmp = Path(tmp)
        data = manifest("jpeg", tmp, args.images, size)
        what = (
            f"{len(data)} {size[0]}x{size[1]} JPEGs from the image cache, batch {args.batch_size}"
        )
        for backbone in backbones:
            checkpoint, images = tmp / backbone, tmp / f"{backbone}.h5"
            make_checkpoint(backbone, data, checkpoint, input_size)
            prep = load_checkpoint(checkpoint)[1].preprocessing
            decode_images(data, backbone, prep, images, progress=False)
            rates = {engine: [] for engine in ENGINES}
            for _ in range(args.repeat):  # interleaved
                for engine in ENGINES:
                    run = (data, checkpoint, images, tmp / "f.h5", params[engine])
                    rates[engine].append(in_fresh_process(timed_extract, *run))
            batches = 1 if args.smoke else 4
            build, *bare = in_fresh_process(timed_engines, checkpoint, args.batch_size, batches)
            # torch as it runs without defuse's allocator policy (page faults on every batch)
            glibc = in_fresh_process(
                torch_rate, checkpoint, args.batch_size, batches, keep_freed=False
            )
            best = {engine: max(r) for engine, r in rates.items()}
            once = build - args.batch_size / bare[0]  # the first batch's forward is no build
            net = len(data) / (len(data) / best["onnxruntime"] - once)
            runs = "; ".join(f"{e}: {', '.join(f'{r:.1f}' for r in rates[e])}" for e in ENGINES)
            print(
                f"{backbone} at {prep.input_size} px ({what}): onnxruntime "
                f"{best['onnxruntime']:.1f} img/s / torch {best['torch']:.1f} img/s = "
                f"{best['onnxruntime'] / best['torch']:.2f} (runs: {runs}); onnxruntime's "
                f"one-time build {once:.1f} s, so {net:.1f} img/s after it (an estimate); "
                f"bare forward {bare[0]:.1f} / {bare[1]:.1f} img/s = {bare[0] / bare[1]:.2f} "
                f"(the ceiling); torch under glibc's default allocator {glibc:.1f} img/s, "
                f"so onnxruntime's bare forward is {bare[0] / glibc:.2f}x that; "
                f"load {os.getloadavg()[0]:.2f}"
            )


if __name__ == "__main__":
    main()
