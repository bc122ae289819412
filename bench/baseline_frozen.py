"""Does fine-tuning earn its keep? Each fine-tuned backbone's val accuracy against a frozen
baseline: the same backbone's ImageNet embeddings + logistic regression (train -> val).

    python bench/baseline_frozen.py [--backbones a,b] [--manifest cache/manifest.csv] [--smoke]

Needs `dvc repro` (or `defuse finetune`) first; reads the fine-tuned figures from each
checkpoint's sidecar. Prints `frozen_baseline_<B>: <fine-tuned> / <frozen> = <ratio>`
(ratio > 1: fine-tuning wins) and the seconds each part took. --smoke: one epoch of the first
backbone at 32 px on 24 small JPEGs, random weights on both sides: checks the code runs.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _datasets import SMOKE_SIZE
from _datasets import manifest as synthetic_manifest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from pipeline import layout
from pipeline.config import backbone_names, finetune_params
from pipeline.data.manifest import read_manifest
from pipeline.data.transforms import ImageDataset, eval_transform, model_input
from pipeline.finetune import finetune
from pipeline.models.checkpoint import read_record
from pipeline.models.registry import backbone_info, create_backbone, embed
from pipeline.runtime import keep_freed_memory, prepare_model, resolve_device


def imagenet_embeddings(
    name: str, input_size: int, manifest, rows: np.ndarray, device, pretrained: bool = True
) -> np.ndarray:
    model = create_backbone(name, manifest.n_classes, pretrained=pretrained)
    model = prepare_model(model.eval(), device)
    prep = backbone_info(name, input_size).preprocessing
    loader = DataLoader(
        ImageDataset.from_manifest(manifest, rows, eval_transform(prep), prep.input_size),
        batch_size=64,
        num_workers=2 if pretrained else 0,
    )
    with torch.inference_mode():
        return torch.cat(
            [embed(model, model_input(x, prep, device))[0].float().cpu() for x, _, _ in loader]
        ).numpy()


def compare(name: str, manifest, checkpoint: Path, device, pretrained: bool = True) -> None:
    """Print ``name``'s fine-tuned val accuracy (``checkpoint``'s sidecar) against the frozen
    baseline's."""
    train, val = manifest.indices("train"), manifest.indices("val")
    record = read_record(checkpoint)
    start = time.perf_counter()
    x_train, x_val = (
        imagenet_embeddings(
            name, record.preprocessing.input_size, manifest, rows, device, pretrained
        )
        for rows in (train, val)
    )
    probe = make_pipeline(
        StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced")
    )
    probe.fit(x_train, manifest.label[train])
    frozen = float((probe.predict(x_val) == manifest.label[val]).mean())
    tuned = record.val_metrics["accuracy"]
    print(
        f"frozen_baseline_{name}: {tuned:.4f} / {frozen:.4f} = {tuned / max(frozen, 1e-9):.3f}  "
        f"({time.perf_counter() - start:.0f} s for the baseline)"
    )


def smoke(device) -> None:
    """The first backbone fine-tuned for one epoch on tiny JPEGs, then compared."""
    name = backbone_names()[0]
    params = finetune_params(
        name, epochs=1, pretrained=False, input_size=32, batch_size=8, num_workers=0, device="cpu"
    )
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        data = synthetic_manifest("jpeg", Path(tmp), 24, SMOKE_SIZE)
        finetune(data, name, params, Path(tmp) / "model", progress=False)
        compare(name, data, Path(tmp) / "model", device, pretrained=False)


def main() -> None:
    keep_freed_memory()  # the allocator policy every defuse process runs with
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=None)
    parser.add_argument("--manifest", default=str(layout.MANIFEST))
    parser.add_argument("--smoke", action="store_true", help="tiny images, seconds")
    args = parser.parse_args()
    device = resolve_device("auto")
    if args.smoke:
        return smoke(device)
    manifest = read_manifest(args.manifest)
    for name in args.backbones.split(",") if args.backbones else backbone_names():
        compare(name, manifest, layout.checkpoint_dir(name), device)


if __name__ == "__main__":
    main()
