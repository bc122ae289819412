"""Extraction against the bare forward pass, and extraction's peak memory at 1x vs 4x images.

Run: .venv/bin/python bench/bench_extract.py [--source jpeg|elpv] [--images 128] [--smoke]
  - `extract()`'s images/s (read, preprocess, forward, write: the whole call) against a
    bare forward loop of the same model at the same batch size on random tensors already
    in memory, twice: reading the image cache that `decode_images` (`defuse decode`, timed
    and printed first) wrote, as the DAG does, and decoding every file, as before it.
    Target ratio >= 0.9. Each timing runs in a process of its own, as `defuse extract` does
    (`_process.py` says why), so the reference is the bare loop's first pass over the
    images in its own process: both pay once for faulting in the activation memory that
    later batches reuse. The bare loop's second pass is printed too.
  - Peak RSS of extracting 4 x --images against --images from the image cache. Target
    ratio ~1: memory must not grow with the dataset.
--source jpeg: synthetic 2560x1920 JPEGs (4 x --images of them); elpv: the default job's
2,624 cells (300x300 PNG), where the RSS comparison uses 1/4 of the manifest vs all of it.
Weights are random (speed does not depend on them). Lines read `<what>: <measured> /
<reference> = <ratio>`. --smoke: 16 small JPEGs, one timing, all in this process: seconds,
to check the code runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from _datasets import JPEG_SIZE, SMOKE_SIZE, manifest
from _process import runner

from pipeline.config import ExtractParams, asdict, finetune_params, section
from pipeline.data.manifest import Manifest, manifest_json_path, read_manifest
from pipeline.extract import extract
from pipeline.models.checkpoint import CheckpointRecord, read_record, save_checkpoint
from pipeline.models.registry import BackboneInfo, backbone_info, create_backbone, embed
from pipeline.runtime import autocast, keep_freed_memory, prepare_model
from pipeline.storage.image_cache import decode_images

SELF, CHILDREN = resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN  # children: loader workers


def untrained_record(info: BackboneInfo, class_names, manifest_sha256: str) -> CheckpointRecord:
    """The record of a checkpoint that was never fine-tuned (benches time, not train)."""
    return CheckpointRecord(
        backbone=info.name,
        class_names=tuple(class_names),
        dim=info.dim,
        preprocessing=info.preprocessing,
        params=asdict(finetune_params(info.name)),
        world_size=1,
        best_epoch=1,
        val_metrics={},
        manifest_sha256=manifest_sha256,  # `extract` refuses a checkpoint of another manifest
        held_out=None,
        versions="{}",
    )


def make_checkpoint(backbone: str, data: Manifest, directory: Path) -> None:
    """A random-weight checkpoint of ``data``'s classes at ``backbone``'s native size."""
    model = create_backbone(backbone, len(data.class_names), pretrained=False, quiet=True)
    record = untrained_record(backbone_info(backbone), data.class_names, data.sha256)
    save_checkpoint(model, directory, record)


def bare_forward(
    backbone: str,
    n_images: int,
    batch_size: int,
    input_size: int | None = None,
    device: str = "cpu",
) -> tuple[float, float]:
    """Images/s of `embed` on random tensors already on ``device``, run as `extract` runs the
    model (bf16 autocast on CUDA), over ``n_images`` in batches: a first pass, which pays
    the first-call allocations (and CUDA's lazy start), and a second; ``input_size`` None:
    the backbone's native size."""
    device = torch.device(device)
    size = backbone_info(backbone, input_size).preprocessing.input_size
    model = create_backbone(backbone, 2, pretrained=False, quiet=True)
    model = prepare_model(model, device).eval()
    batch = torch.randn(min(batch_size, n_images), 3, size, size, device=device)
    batch = batch.contiguous(memory_format=torch.channels_last)

    def one_pass() -> float:
        start = time.perf_counter()
        for first in range(0, n_images, batch_size):
            embedding, _ = embed(model, batch[: min(batch_size, n_images - first)])
        embedding.cpu()  # waits for a GPU's queued work
        return n_images / (time.perf_counter() - start)

    with torch.inference_mode(), autocast(device):
        return one_pass(), one_pass()


def timed_decode(data, checkpoint: Path, out: Path, workers: int | None = None) -> float:
    """Seconds `decode_images` takes to write ``out`` for ``checkpoint``'s squares."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    info = read_record(checkpoint).info
    decode_images(data, info.name, info.preprocessing, out, workers, progress=False)
    return time.perf_counter() - start


def timed_extract(
    data, checkpoint: Path, out: Path, params: ExtractParams, images: Path | None = None
) -> tuple[float, float, float]:
    """Images/s of the whole `extract` call (``images``: the image cache it reads), and the
    peak RSS (MB) so far of this process and of its largest loader worker."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    extract(data, checkpoint, out, params, progress=False, images=images)
    rate = len(data) / (time.perf_counter() - start)
    own, worker = (resource.getrusage(who).ru_maxrss / 1024 for who in (SELF, CHILDREN))
    return rate, own, worker


def quarter_manifest(data, tmp: Path):
    """The first quarter of ``data``'s rows, as a manifest file of its own."""
    lines = data.path.read_text().splitlines()
    out = tmp / "quarter" / "manifest.csv"
    out.parent.mkdir(parents=True)
    out.write_text("\n".join(lines[: 1 + (len(lines) - 1) // 4]) + "\n")
    manifest_json_path(out).write_bytes(manifest_json_path(data.path).read_bytes())
    return read_manifest(out)


def _rates(rates) -> str:
    return ", ".join(f"{r:.1f}" for r in rates)


def main() -> None:
    keep_freed_memory()  # the allocator policy every defuse process runs with (decode here)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=("jpeg", "elpv"), default="jpeg")
    parser.add_argument("--images", type=int, default=128, help="jpeg: the 1x image count")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    defaults = section(ExtractParams, "extract")  # what `defuse extract` runs with
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--repeat", type=int, default=3, help="best of N timings")
    parser.add_argument("--decode-workers", type=int, help="decoding processes [every core]")
    parser.add_argument("--smoke", action="store_true", help="tiny images, seconds")
    args = parser.parse_args()
    if args.smoke:
        args.source, args.images, args.repeat = "jpeg", 4, 1
        args.batch_size, args.num_workers, args.decode_workers = 8, 0, 1
    in_fresh_process = runner(args.smoke)
    params = section(
        ExtractParams,
        "extract",
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device="cpu",
    )
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} on "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        tmp = Path(tmp)
        data = manifest(args.source, tmp, 4 * args.images, SMOKE_SIZE if args.smoke else JPEG_SIZE)
        make_checkpoint(args.backbone, data, tmp / "model")
        images = tmp / "images.h5"
        took = timed_decode(data, tmp / "model", images, args.decode_workers)
        print(
            f"decode once ({len(data)} {args.source} images, "
            f"{args.decode_workers or len(os.sched_getaffinity(0))} processes): {took:.1f} s, "
            f"{len(data) / took:.1f} img/s, {images.stat().st_size / 1e6:.0f} MB"
        )
        ways = {"image cache": images, "decoding every file": None}
        bare, runs = [], {how: [] for how in ways}
        for _ in range(args.repeat):  # interleaved: a slow spell of a shared machine hits all
            bare.append(in_fresh_process(bare_forward, args.backbone, len(data), args.batch_size))
            for how, cache in ways.items():
                args_ = (data, tmp / "model", tmp / "f.h5", params, cache)
                runs[how].append(in_fresh_process(timed_extract, *args_))
        first, second = max(bare)
        print(
            f"bare forward images/s, a fresh process's first pass: {first:.1f}; second: "
            f"{second:.1f} (first passes of the {args.repeat} runs: {_rates(r for r, _ in bare)})"
        )
        what = (
            f"{len(data)} {args.source} images, batch {args.batch_size}, {args.num_workers} workers"
        )
        for how in ways:
            rates = [rate for rate, *_ in runs[how]]
            print(
                f"extract images/s ({what}, {how}): {max(rates):.1f} / bare forward {first:.1f} "
                f"= {max(rates) / first:.2f} (runs: {_rates(rates)})"
            )

        small = quarter_manifest(data, tmp)
        make_checkpoint(args.backbone, small, tmp / "small")  # extract checks the lineage
        rss_1x = in_fresh_process(timed_extract, small, tmp / "small", tmp / "s.h5", params, images)
        pairs = zip(
            ("process", "largest loader worker"),
            runs["image cache"][0][1:],
            rss_1x[1:],
            strict=True,
        )
        for who, a, b in pairs:
            print(
                f"extract peak RSS of the {who}, {len(data)} vs {len(small)} images: "
                f"{a:.0f} MB / {b:.0f} MB = {a / b:.2f}"
            )


if __name__ == "__main__":
    main()
