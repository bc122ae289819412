"""Fine-tuning's training pass against a bare forward + backward + step loop.

Run: .venv/bin/python bench/bench_finetune.py [--backbone tf_efficientnet_lite0] [--source elpv]
                                              [--smoke]
Two epochs of `finetune()` with params.yaml's settings for the backbone (frozen stages,
batch size, input size, augmentation, loader workers) on the default job's ELPV cells (or
--source jpeg: synthetic 2560x1920 JPEGs), the second timed over its training pass
(history's `train_s`; the first pays the loader's start-up), against the same model, frozen
layers, optimizer and batch size stepping on random tensors already in memory. Twice:
reading the image cache `decode_images` (`defuse decode`, timed and printed first) wrote,
as the DAG does, and decoding every file each epoch, as before it. Each run in a process of
its own, as `defuse finetune` runs (`_process.py` says why). Target ratio >= 0.85.
Prints `<what>: <measured> / <reference> = <ratio>`. --smoke: 24 small JPEGs at 32 px, all
in this process: seconds, to check the code runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from _datasets import JPEG_SIZE, SMOKE_SIZE, manifest
from _process import runner
from torch import nn

from pipeline.config import finetune_params
from pipeline.data.transforms import target_info
from pipeline.finetune import finetune
from pipeline.models.registry import backbone_info, create_backbone, freeze_stages, set_train_mode
from pipeline.runtime import autocast, keep_freed_memory, prepare_model
from pipeline.storage.image_cache import decode_images


def bare_training(
    backbone: str, params, n_classes: int, n_images: int, device: str = "cpu"
) -> float:
    """Images/s of forward + backward + RMSprop step on tensors already on ``device``, with
    the autocast `finetune` uses there (bf16 on CUDA): the second of two passes over
    ``n_images``."""
    device = torch.device(device)
    model = create_backbone(backbone, n_classes, pretrained=False, drop_rate=params.dropout)
    freeze_stages(model, params.frozen_stages)
    model = set_train_mode(prepare_model(model, device))
    optimizer = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    size = backbone_info(backbone, params.input_size).preprocessing.input_size
    b = min(params.batch_size, n_images)  # the real loop never sees a larger batch
    images = torch.randn(b, 3, size, size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, n_classes, (b,), device=device)

    def step(n: int) -> torch.Tensor:
        with autocast(device):
            loss = nn.functional.cross_entropy(model(images[:n]), labels[:n])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def one_pass() -> float:
        start = time.perf_counter()
        for first in range(0, n_images, b):
            loss = step(min(b, n_images - first))
        loss.item()  # waits for a GPU's queued work
        return n_images / (time.perf_counter() - start)

    one_pass()  # as the timed epoch is the second: allocations and CUDA start-up are paid
    return one_pass()


def second_epoch(data, backbone: str, params, out: Path, images: Path | None) -> float:
    """Images/s of the training pass of `finetune()`'s second epoch (``images``: the image
    cache it reads)."""
    result = finetune(data, backbone, params, out, progress=False, images=images)
    return len(data.indices("train")) / result.history[-1]["train_s"]


def main() -> None:
    keep_freed_memory()  # the allocator policy every defuse process runs with (decode here)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--source", choices=("elpv", "jpeg"), default="elpv")
    parser.add_argument("--images", type=int, default=640, help="jpeg only: how many")
    parser.add_argument("--num-workers", type=int, default=None, help="default: params.yaml")
    parser.add_argument("--smoke", action="store_true", help="tiny images, seconds")
    args = parser.parse_args()
    tiny = {"input_size": 32, "batch_size": 8, "num_workers": 0} if args.smoke else {}
    if args.smoke:
        args.source, args.images = "jpeg", 24
    params = finetune_params(
        args.backbone,
        epochs=2,
        pretrained=False,
        device="cpu",
        **({"num_workers": args.num_workers} | tiny),
    )
    in_fresh_process = runner(args.smoke)
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} on "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        tmp = Path(tmp)
        data = manifest(args.source, tmp, args.images, SMOKE_SIZE if args.smoke else JPEG_SIZE)
        start = time.perf_counter()
        info = target_info(args.backbone, params)
        prep = info.preprocessing
        images = decode_images(data, args.backbone, prep, tmp / "i.h5", progress=False).path
        took = time.perf_counter() - start
        print(f"decode once ({len(data)} {args.source} images): {took:.1f} s")
        n_train = len(data.indices("train"))
        size = backbone_info(args.backbone, params.input_size).preprocessing.input_size
        bare = in_fresh_process(bare_training, args.backbone, params, data.n_classes, n_train)
        what = (
            f"{args.backbone}, {n_train} {args.source} images at {size} px, batch "
            f"{params.batch_size}, {params.frozen_stages} stages frozen, "
            f"{params.num_workers} workers"
        )
        for how, cache in (("image cache", images), ("decoding every file", None)):
            ours = in_fresh_process(second_epoch, data, args.backbone, params, tmp / "model", cache)
            print(
                f"finetune epoch 2 images/s ({what}, {how}): {ours:.1f} / bare loop {bare:.1f} "
                f"= {ours / bare:.2f}"
            )


if __name__ == "__main__":
    main()
