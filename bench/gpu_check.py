"""One command that runs this project on a GPU and says how close it comes to the bare model.

Run: .venv/bin/python bench/gpu_check.py            # one CUDA GPU, a few minutes
     .venv/bin/python bench/gpu_check.py --smoke    # the same code on the CPU in seconds

Nothing is downloaded: the images are synthetic JPEGs (2560x1920, the fusion paper's camera
size, unless --image-size) written to a temp folder, and the weights are random
(`pretrained: false`; speed does not depend on them). On CUDA, fine-tuning, extraction and
the bare loops all run with bf16 autocast and channels-last, as `pipeline/runtime.py` sets.

1. resnet50 and inception_v3, each with the fusion preset's settings for it (batch, frozen
   stages, optimizer, augmentation, loader workers): the images decoded once into an image
   cache (`decode_images`, timed); two epochs of `finetune()`, the second timed (the first
   pays loader start-up and CUDA's lazy initialisation), against forward + backward + step
   on random tensors already on the device; then `extract()` into an HDF5 cache (the whole
   call, best of 2) against a bare forward loop. Each reading the image cache, as the DAG
   does, and decoding every file, as before it. Lines read `<what>: <measured> /
   <reference> = <ratio>`, then timm's published throughput for the model, measured on
   other GPUs, for scale.
2. Both paper presets, each as a params file derived from the preset (random weights, one
   epoch, the synthetic images in the paper's number of classes), through the DAG's stage
   commands in a temp project: `defuse prepare`, `decode B`, `finetune B` and `extract B`
   for every backbone, `fuse H` for every head, `evaluate`. Pass or FAIL, and the time
   taken.

--smoke: 64x48 images, 75 px inputs (the smallest inception_v3 and v4 accept), one batch
per pass, one timing of each, one thread, no loader workers, each preset's first backbone
only. Exit status 1 when any part fails; the other parts still run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import yaml
from _datasets import JPEG_SIZE, manifest, write_jpegs
from bench_extract import bare_forward, timed_extract
from bench_finetune import bare_training, second_epoch

from pipeline.config import ExtractParams, finetune_params, section
from pipeline.data.manifest import Manifest
from pipeline.data.transforms import target_info
from pipeline.runtime import keep_freed_memory
from pipeline.storage.image_cache import decode_images
from stages.cli import main as defuse

PRESETS = Path(__file__).resolve().parents[1] / "pipeline" / "presets"
FUSION = PRESETS / "fusion_paper.yaml"  # its per-model settings drive part 1
MODELS = ("resnet50", "inception_v3")
PRESET_CLASSES = {"fusion_paper": 12, "attention_paper": 11}  # the papers' class counts

# timm publishes throughput only in its repository's results/*.csv (the wheel has none), so
# the figures are copied here: (images/s, input px, batch) of the named row of each file.
TIMM_PUBLISHED = {
    ("resnet50", "inference"): (5088.39, 224, 512),
    ("inception_v3", "inference"): (4356.9, 299, 512),
    ("resnet50", "training"): (1218.01, 224, 512),
    ("inception_v3", "training"): (782.35, 299, 384),
}
TIMM_SOURCES = {
    "inference": "huggingface/pytorch-image-models results/"
    "benchmark-infer-amp-nhwc-pt240-cu124-rtx4090.csv @7479d45: RTX 4090, PyTorch 2.4, "
    "float16 AMP, channels-last",
    "training": "huggingface/pytorch-image-models results/"
    "benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv @5e7d47c: RTX 3090, PyTorch 1.12, "
    "float16 AMP, channels-last, every layer trained",
}


@dataclass(frozen=True)
class Mode:
    """What one run exercises: the GPU check, or the same code kept small on the CPU."""

    device: str
    images: int  # part 1's set: synthetic JPEGs in two classes
    image_size: tuple[int, int]  # (width, height) of every synthetic JPEG
    per_class: int  # part 2's sets: images per class
    input_size: int | None = None  # None: each model's and preset's own
    num_workers: int | None = None  # None: the preset's loader workers
    preset_backbones: int | None = None  # None: all of a preset's backbones, else its first N
    fractions: tuple[float, float] | None = None  # (test, val); None: the preset's
    repeat: int = 2  # extraction and its bare forward: best of N


GPU = Mode("cuda", images=512, image_size=JPEG_SIZE, per_class=12)  # 12: the least the
# presets' split fractions (test 0.12, val 0.1) accept per class
SMOKE = Mode(
    "cpu",
    images=16,  # 7 per class is the least _datasets' split fractions (0.2, 0.2) accept
    image_size=(64, 48),
    per_class=3,  # with these fractions: one image per class in each split
    input_size=75,  # the smallest inception_v3 and v4 accept
    num_workers=0,
    preset_backbones=1,
    fractions=(1 / 3, 1 / 2),
    repeat=1,
)


def throughput(backbone: str, data: Manifest, mode: Mode, tmp: Path) -> None:
    """Print fine-tuning's and extraction's images/s of ``backbone`` against its bare loops."""
    params = finetune_params(
        backbone,
        FUSION,
        epochs=2,
        pretrained=False,
        device=mode.device,
        num_workers=mode.num_workers,
        input_size=mode.input_size,
    )
    checkpoint, info = tmp / backbone, target_info(backbone, params)
    start = time.perf_counter()
    prep = info.preprocessing
    images = decode_images(data, backbone, prep, tmp / f"{backbone}-images.h5", progress=False).path
    took = time.perf_counter() - start
    print(
        f"{backbone} decode once ({len(data)} images at {info.preprocessing.input_size} px): {took:.1f} s"
    )
    ways = (("decoding every file", None), ("image cache", images))
    n_train, size = len(data.indices("train")), info.preprocessing.input_size
    bare = bare_training(backbone, params, data.n_classes, n_train, mode.device)
    what = (
        f"{n_train} images at {size} px, batch {params.batch_size}, "
        f"{params.frozen_stages} stages frozen, {params.num_workers} workers"
    )
    for how, cache in ways:
        ours = second_epoch(data, backbone, params, checkpoint, cache)  # leaves the checkpoint
        print(
            f"{backbone} finetune epoch images/s ({what}, {how}): {ours:.1f} / bare loop "
            f"{bare:.1f} = {ours / bare:.2f}"
        )

    extract_params = section(
        ExtractParams, "extract", FUSION, device=mode.device, num_workers=mode.num_workers
    )
    out, batch = tmp / f"{backbone}.h5", extract_params.batch_size
    # Against the bare loop's second pass: the first pays CUDA's lazy start-up, which the
    # best of `extract`'s repeats in this process has paid already.
    bare = max(
        bare_forward(backbone, len(data), batch, size, mode.device)[1] for _ in range(mode.repeat)
    )
    what = f"{len(data)} images at {size} px, batch {batch}, {extract_params.num_workers} workers"
    for how, cache in ways:
        ours = max(
            timed_extract(data, checkpoint, out, extract_params, cache)[0]
            for _ in range(mode.repeat)
        )
        print(
            f"{backbone} extract images/s ({what}, {how}): {ours:.1f} / bare forward {bare:.1f} "
            f"= {ours / bare:.2f}"
        )
    for kind in ("inference", "training"):
        rate, px, n = TIMM_PUBLISHED[backbone, kind]
        print(
            f"  timm's published {kind} throughput, not measured here: {rate:.0f} img/s at "
            f"{px} px, batch {n} ({TIMM_SOURCES[kind]}, row {backbone})"
        )


def preset_params(preset: Path, mode: Mode, images: Path) -> dict:
    """The preset's params with the check's changes: random weights, one epoch, ``images``;
    the mode's devices, input size, workers, split fractions and backbone subset."""
    params = yaml.safe_load(preset.read_text())
    prepare, tune, extract = params["prepare"], params["finetune"], params["extract"]
    prepare["root"] = str(images)
    if mode.fractions:
        prepare["test_fraction"], prepare["val_fraction"] = mode.fractions
    tune.update(epochs=1, pretrained=False, device=mode.device)
    extract["device"] = mode.device
    if mode.num_workers is not None:
        tune["num_workers"] = extract["num_workers"] = mode.num_workers
    names = list(params["backbones"])[: mode.preset_backbones]
    params["backbones"] = {name: dict(params["backbones"][name] or {}) for name in names}
    if mode.input_size:  # `backbones.<name>` wins over `finetune`, so set it there
        for entry in params["backbones"].values():
            entry["input_size"] = mode.input_size
    if params["fuse"]["backbones"]:
        params["fuse"]["backbones"] = [b for b in params["fuse"]["backbones"] if b in names]
    return params


def run_preset(preset: Path, mode: Mode, project: Path) -> None:
    """Every DAG stage of ``preset`` in ``project`` (which holds ``images/``), in order."""
    params = preset_params(preset, mode, project / "images")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commands = [["prepare"]]
    for backbone in params["backbones"]:
        commands += [["decode", backbone], ["finetune", backbone], ["extract", backbone]]
    commands += [["fuse", head] for head in params["heads"]] + [["evaluate"]]
    print(
        f"preset {preset.stem}: backbones {', '.join(params['backbones'])}; heads "
        f"{', '.join(params['heads'])}; {PRESET_CLASSES[preset.stem]} classes x "
        f"{mode.per_class} images",
        flush=True,
    )
    with contextlib.chdir(project):  # the stages' default paths are relative, as under DVC
        for args in commands:
            print(f"$ defuse {' '.join(args)}", flush=True)
            try:
                defuse.main(args, prog_name="defuse", standalone_mode=False)
            except Exception as exc:
                raise RuntimeError(f"`defuse {' '.join(args)}` failed: {exc}") from exc


def checked(name: str, fn, *args) -> bool:
    """Run ``fn(*args)`` and print `name: pass in T s`, or its traceback and one FAIL line."""
    start = time.perf_counter()
    try:
        fn(*args)
    except Exception as exc:
        traceback.print_exc()
        line = (str(exc).strip().splitlines() or [""])[0]
        took = time.perf_counter() - start
        print(f"{name}: FAIL after {took:.1f} s: {type(exc).__name__}: {line}", flush=True)
        return False
    print(f"{name}: pass in {time.perf_counter() - start:.1f} s", flush=True)
    return True


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT, e.g. 640x480; got {text!r}"
        ) from None
    return width, height


def main() -> int:
    keep_freed_memory()  # the allocator policy every defuse process runs with
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="the CPU version, in seconds")
    parser.add_argument("--images", type=int, help=f"part 1's image count [{GPU.images}]")
    parser.add_argument("--image-size", type=_size, help="WxH of the synthetic JPEGs")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU check")
    mode = SMOKE if args.smoke else GPU
    changes = {"images": args.images, "image_size": args.image_size}
    mode = dataclasses.replace(mode, **{k: v for k, v in changes.items() if v is not None})
    device = torch.device(mode.device)
    if args.smoke:  # tiny tensors gain nothing from a second thread, and on a busy machine
        torch.set_num_threads(1)  # OpenMP's spin-waiting makes two several times slower
    runs = "bf16 autocast" if device.type == "cuda" else "float32"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"machine: {name}, {os.cpu_count()} cores, torch {torch.__version__} on "
        f"{torch.get_num_threads()} threads, timm {timm.__version__}; {runs}, channels-last"
    )

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp, start = Path(tmp), time.perf_counter()
        # All images first: the writers fork, which is safest before CUDA starts.
        data = manifest("jpeg", tmp / "part1", mode.images, mode.image_size)
        for stem, n_classes in PRESET_CLASSES.items():
            classes = [f"class{k:02d}" for k in range(n_classes)]
            images = tmp / stem / "images"
            write_jpegs(images, n_classes * mode.per_class, mode.image_size, classes=classes)
        (width, height), took = mode.image_size, time.perf_counter() - start
        print(f"synthetic {width}x{height} JPEGs and a manifest in {took:.1f} s")

        passed = [checked(f"{b} throughput", throughput, b, data, mode, tmp) for b in MODELS]
        for stem in PRESET_CLASSES:
            preset = PRESETS / f"{stem}.yaml"
            passed.append(checked(f"preset {stem}", run_preset, preset, mode, tmp / stem))
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
