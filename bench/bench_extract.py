"""Extraction against the bare forward pass, and extraction's peak memory at 1x vs 4x images.

Run: .venv/bin/python bench/bench_extract.py [--source jpeg|elpv] [--images 128]
  - `extract()`'s images/s (read, preprocess, forward, write: the whole call) against a
    bare forward loop of the same model at the same batch size on random tensors already
    in memory, twice: reading the image cache that `decode_images` (`defuse decode`, timed
    and printed first) wrote, as the DAG does, and decoding every file, as before it.
    Target ratio >= 0.9.
  - Peak RSS of extracting 4 x --images against --images from the image cache, each in a
    fresh process. Target ratio ~1: memory must not grow with the dataset.
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
from pipeline.checkpoint import backbone_info_of, read_sidecar, save_checkpoint
from pipeline.config import ExtractParams, asdict, finetune_params, section
from pipeline.data import Manifest, manifest_json_path, read_manifest
from pipeline.features import extract
from pipeline.image_cache import decode_images
from pipeline.runtime import autocast, keep_freed_memory, prepare_model


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
        "params": asdict(finetune_params(backbone)),  # extract reads cross_fit from it
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


def timed_decode(data, checkpoint: Path, out: Path, workers: int | None = None) -> float:
    """Seconds `decode_images` takes to write ``out`` for ``checkpoint``'s squares."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    decode_images(data, backbone_info_of(read_sidecar(checkpoint)), out, workers, progress=False)
    return time.perf_counter() - start


def timed_extract(
    data, checkpoint: Path, out: Path, params: ExtractParams, images: Path | None = None
) -> float:
    """Images/s of the whole `extract` call; ``images``: the image cache it reads."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    extract(data, checkpoint, out, params, progress=False, images=images)
    return len(data) / (time.perf_counter() - start)


def peak_rss(
    data, checkpoint: Path, out: Path, params: ExtractParams, images: Path
) -> tuple[float, float]:
    """Peak RSS (MB) of an extraction in a fresh process, and of its largest loader worker."""
    code = (
        "import resource; from pathlib import Path; from pipeline.config import ExtractParams;"
        "from pipeline.runtime import keep_freed_memory; keep_freed_memory();"
        "from pipeline.data import read_manifest; from pipeline.features import extract;"
        f"extract(read_manifest({str(data.path)!r}), Path({str(checkpoint)!r}),"
        f" Path({str(out)!r}), ExtractParams(**{dataclasses.asdict(params)!r}),"
        f" progress=False, images=Path({str(images)!r}));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the extraction whose memory was measured failed:\n{done.stderr}")
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
    keep_freed_memory()  # the allocator policy every defuse process runs with
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
    parser.add_argument("--decode-workers", type=int, help="decoding processes [every core]")
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
        images = tmp / "images.h5"
        took = timed_decode(data, tmp / "model", images, args.decode_workers)
        print(
            f"decode once ({len(data)} {args.source} images, "
            f"{args.decode_workers or len(os.sched_getaffinity(0))} processes): {took:.1f} s, "
            f"{len(data) / took:.1f} img/s, {images.stat().st_size / 1e6:.0f} MB"
        )
        bare = max(
            bare_forward(args.backbone, len(data), args.batch_size) for _ in range(args.repeat)
        )
        what = (
            f"{len(data)} {args.source} images, batch {args.batch_size}, {args.num_workers} workers"
        )
        for how, cache in (("image cache", images), ("decoding every file", None)):
            ours = max(
                timed_extract(data, tmp / "model", tmp / "f.h5", params, cache)
                for _ in range(args.repeat)
            )
            print(
                f"extract images/s ({what}, {how}): {ours:.1f} / bare forward {bare:.1f} "
                f"= {ours / bare:.2f}"
            )

        small = quarter_manifest(data, tmp)
        make_checkpoint(args.backbone, small, tmp / "small")  # extract checks the lineage
        rss_1x = peak_rss(small, tmp / "small", tmp / "s.h5", params, images)
        rss_4x = peak_rss(data, tmp / "model", tmp / "f.h5", params, images)
        for who, a, b in zip(("process", "largest loader worker"), rss_4x, rss_1x, strict=True):
            print(
                f"extract peak RSS of the {who}, {len(data)} vs {len(small)} images: "
                f"{a:.0f} MB / {b:.0f} MB = {a / b:.2f}"
            )


if __name__ == "__main__":
    main()
