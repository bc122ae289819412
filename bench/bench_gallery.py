"""What `defuse evaluate`'s pictures of the errors cost: thumbnails, Grad-CAM by each backbone
of params.yaml (at its input size there) and the PNGs, for `evaluate.gallery` ELPV cells.

Run: .venv/bin/python bench/bench_gallery.py [--images 16] [--out DIR] [--smoke]
Checkpoints are the ImageNet weights with a new 4-class layer (speed does not depend on
fine-tuning; the pictures then show ImageNet features, not defects); the "errors" are the
first --images cells. Lines read `<what>: <seconds> s`; the budget is 60 s on 2 cores.
--smoke: 2 cells, the first backbone at 32 px with random weights: checks the code runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_extract import untrained_record

from pipeline.config import PrepareParams, backbone_names, evaluate_params, finetune_params, section
from pipeline.data.sources import ELPV_CLASSES, elpv_root
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.registry import backbone_info, create_backbone
from pipeline.report.explain import Gallery, explain, thumbnail
from pipeline.report.figures import plot_gallery
from pipeline.runtime import keep_freed_memory, resolve_device


def main() -> None:
    keep_freed_memory()  # the allocator policy every defuse process runs with
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=evaluate_params().gallery)
    parser.add_argument("--out", type=Path, help="Keep the PNGs here (default: a temp folder).")
    parser.add_argument("--smoke", action="store_true", help="2 cells, 1 tiny backbone")
    args = parser.parse_args()
    backbones = backbone_names()[:1] if args.smoke else backbone_names()
    if args.smoke:
        args.images = 2
    paths = sorted((elpv_root() / "images").glob("*.png"))[: args.images]
    classes = np.arange(len(paths)) % 4
    device = resolve_device(evaluate_params().device)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "gallery"
        out.mkdir(parents=True, exist_ok=True)
        cams, total = {}, 0.0
        max_pixels = section(PrepareParams, "prepare").max_pixels
        for backbone in backbones:
            size = 32 if args.smoke else finetune_params(backbone).input_size
            info = backbone_info(backbone, size)
            model = create_backbone(backbone, 4, pretrained=not args.smoke, quiet=True)
            record = untrained_record(info, ELPV_CLASSES[4], "0" * 64)  # no manifest here
            sha = save_checkpoint(model, Path(tmp) / backbone, record).weights_sha256
            start = time.perf_counter()
            cams[backbone] = explain(
                Path(tmp) / backbone, paths, classes, sha, max_pixels=max_pixels, device=device
            )
            took = time.perf_counter() - start
            total += took
            print(
                f"Grad-CAM {backbone} at {info.preprocessing.input_size} px, {len(paths)} images: {took:.2f} s"
            )
        start = time.perf_counter()
        gallery = Gallery(
            head="bench",
            n_test=len(paths),
            n_errors=len(paths),
            class_names=ELPV_CLASSES[4],
            names=tuple(p.name for p in paths),
            thumbnails=tuple(thumbnail(p, max_pixels) for p in paths),
            true=(classes + 1) % 4,
            pred=classes,
            prob=np.linspace(0.99, 0.5, len(paths)),
            cams=cams,
            skipped={},
        )
        plot_gallery(gallery, out)
        took = time.perf_counter() - start
        total += took
        print(f"thumbnails and {1 + len(cams)} PNGs: {took:.2f} s")
        print(f"gallery total: {total:.2f} s (budget 60 s)")


if __name__ == "__main__":
    main()
