"""Does fine-tuning earn its keep? Each fine-tuned backbone's val accuracy against a frozen
baseline: the same backbone's ImageNet embeddings + logistic regression (train -> val).

    python bench/baseline_frozen.py [--backbones a,b] [--manifest cache/manifest.csv]

Needs `dvc repro` (or `defuse finetune`) first; reads the fine-tuned figures from each
checkpoint's sidecar. Prints `frozen_baseline_<B>: <fine-tuned> / <frozen> = <ratio>`
(ratio > 1: fine-tuning wins) and the seconds each part took.
"""

import argparse
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from pipeline import layout
from pipeline.config import backbone_names
from pipeline.data.manifest import read_manifest
from pipeline.data.transforms import ImageDataset, eval_transform, model_input
from pipeline.models.checkpoint import read_record
from pipeline.models.registry import backbone_info, create_backbone, embed
from pipeline.runtime import keep_freed_memory, prepare_model, resolve_device


def imagenet_embeddings(
    name: str, input_size: int, manifest, rows: np.ndarray, device
) -> np.ndarray:
    model = prepare_model(create_backbone(name, manifest.n_classes, pretrained=True).eval(), device)
    prep = backbone_info(name, input_size).preprocessing
    loader = DataLoader(
        ImageDataset.from_manifest(manifest, rows, eval_transform(prep), prep.input_size),
        batch_size=64,
        num_workers=2,
    )
    with torch.inference_mode():
        return torch.cat(
            [embed(model, model_input(x, prep, device))[0].float().cpu() for x, _, _ in loader]
        ).numpy()


def main() -> None:
    keep_freed_memory()  # the allocator policy every defuse process runs with
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=None)
    parser.add_argument("--manifest", default=str(layout.MANIFEST))
    args = parser.parse_args()
    manifest = read_manifest(args.manifest)
    train, val = manifest.indices("train"), manifest.indices("val")
    device = resolve_device("auto")
    for name in args.backbones.split(",") if args.backbones else backbone_names():
        record = read_record(layout.checkpoint_dir(name))
        input_size = record.preprocessing.input_size
        start = time.perf_counter()
        x_train = imagenet_embeddings(name, input_size, manifest, train, device)
        x_val = imagenet_embeddings(name, input_size, manifest, val, device)
        probe = make_pipeline(
            StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced")
        )
        probe.fit(x_train, manifest.label[train])
        frozen = float((probe.predict(x_val) == manifest.label[val]).mean())
        tuned = record.val_metrics["accuracy"]
        print(
            f"frozen_baseline_{name}: {tuned:.4f} / {frozen:.4f} = {tuned / frozen:.3f}  ({time.perf_counter() - start:.0f} s for the baseline)"
        )


if __name__ == "__main__":
    main()
