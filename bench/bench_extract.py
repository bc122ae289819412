"""Extraction against the bare forward pass, and extraction's peak memory at 1x vs 4x images.

Run: .venv/bin/python bench/bench_extract.py [--source jpeg|elpv] [--images 128]
  - `extract()`'s images/s (decode, preprocess, forward, write: the whole call) against a
    bare forward loop of the same model at the same batch size on random tensors already
    in memory. Target ratio >= 0.9.
  - Peak RSS of extracting 4 x --images against --images, each in a fresh process.
    Target ratio ~1: memory must not grow with the dataset.
--source jpeg: synthetic 2560x1920 JPEGs (4 x --images of them); elpv: the default job's
2,624 cells (300x300 PNG), where the RSS comparison uses 1/4 of the manifest vs all of it.
Weights are random (speed does not depend on them). Lines read `<what>: <measured> /
<reference> = <ratio>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _datasets import manifest

from pipeline.backbones import backbone_info, create_backbone, embed
from pipeline.checkpoint import save_checkpoint
from pipeline.config import ExtractParams, section
from pipeline.data import Manifest, manifest_json_path, read_manifest
from pipeline.features import extract
from pipeline.runtime import autocast, prepare_model


def make_checkpoint(backbone: str, data: Manifest, directory: Path) -> None:
    """A random-weight checkpoint of ``data``'s classes with the sidecar fields `extract` reads."""
    class_names = list(data.class_names)
    info = backbone_info(backbone)
    model = create_backbone(backbone, len(class_names), pretrained=False, quiet=True)
    sidecar = {
        **{k: v for k, v in dataclasses.asdict(info).items() if k != "name"},
        "backbone": backbone,
        "num_classes": len(class_names),
        "class_names": class_names,
        "manifest_sha256": data.sha256,  # `extract` refuses a checkpoint of another manifest
    }
    save_checkpoint(model, directory, sidecar)


def bare_forward(
    backbone: str,
    n_images: int,
    batch_size: int,
    input_size: int | None = None,
    device: str = "cpu",
) -> float:
    """Images/s of `embed` on random tensors already on ``device``, run as `extract` runs the
    model (bf16 autocast on CUDA); ``input_size`` None: the backbone's native size."""
    device = torch.device(device)
    size = backbone_info(backbone, input_size).input_size
    model = create_backbone(backbone, 2, pretrained=False, quiet=True)
    model = prepare_model(model, device).eval()
    batch = torch.randn(min(batch_size, n_images), 3, size, size, device=device)
    batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device):
        embed(model, batch)[0].cpu()  # warm-up: first-call allocations; .cpu() waits for a GPU
        start = time.perf_counter()
        for first in range(0, n_images, batch_size):
            embedding, _ = embed(model, batch[: min(batch_size, n_images - first)])
        embedding.cpu()
        return n_images / (time.perf_counter() - start)


def timed_extract(data, checkpoint: Path, out: Path, params: ExtractParams) -> float:
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    extract(data, checkpoint, out, params, progress=False)
    return len(data) / (time.perf_counter() - start)


def peak_rss(data, checkpoint: Path, out: Path, params: ExtractParams) -> tuple[float, float]:
    """Peak RSS (MB) of an extraction in a fresh process, and of its largest loader worker."""
    code = (
        "import resource; from pipeline.config import ExtractParams;"
        "from pipeline.data import read_manifest; from pipeline.features import extract;"
        f"extract(read_manifest({str(data.path)!r}), {str(checkpoint)!r}, {str(out)!r},"
        f" ExtractParams(**{dataclasses.asdict(params)!r}), progress=False);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    own, worker = done.stdout.split()[-2:]
    return int(own) / 1024, int(worker) / 1024


def quarter_manifest(data, tmp: Path):
    """The first quarter of ``data``'s rows, as a manifest file of its own."""
    lines = data.path.read_text().splitlines()
    out = tmp / "quarter" / "manifest.csv"
    out.parent.mkdir(parents=True)
    out.write_text("\n".join(lines[: 1 + (len(lines) - 1) // 4]) + "\n")
    manifest_json_path(out).write_bytes(manifest_json_path(data.path).read_bytes())
    return read_manifest(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=("jpeg", "elpv"), default="jpeg")
    parser.add_argument("--images", type=int, default=128, help="jpeg: the 1x image count")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    defaults = section(ExtractParams, "extract")  # what `defuse extract` runs with
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--repeat", type=int, default=2, help="best of N timings")
    args = parser.parse_args()
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
        data = manifest(args.source, tmp, 4 * args.images)
        make_checkpoint(args.backbone, data, tmp / "model")
        ours = max(
            timed_extract(data, tmp / "model", tmp / "f.h5", params) for _ in range(args.repeat)
        )
        bare = max(
            bare_forward(args.backbone, len(data), args.batch_size) for _ in range(args.repeat)
        )
        what = (
            f"{len(data)} {args.source} images, batch {args.batch_size}, {args.num_workers} workers"
        )
        print(
            f"extract images/s ({what}): {ours:.1f} / bare forward {bare:.1f} = {ours / bare:.2f}"
        )

        small = quarter_manifest(data, tmp)
        rss_1x = peak_rss(small, tmp / "model", tmp / "s.h5", params)
        rss_4x = peak_rss(data, tmp / "model", tmp / "f.h5", params)
        for who, a, b in zip(("process", "largest loader worker"), rss_4x, rss_1x, strict=True):
            print(
                f"extract peak RSS of the {who}, {len(data)} vs {len(small)} images: "
                f"{a:.0f} MB / {b:.0f} MB = {a / b:.2f}"
            )


if __name__ == "__main__":
    main()
