"""Preprocessing built from a backbone's own config, and the dataset that feeds it images.

Images are resized to (size, size) without cropping: defects often sit at the borders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from pipeline.backbones import BackboneInfo
from pipeline.config import FinetuneParams
from pipeline.data import Manifest, load_image

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


def eval_transform(info: BackboneInfo) -> T.Compose:
    """Deterministic: resize, to tensor, normalize with the backbone's mean/std."""
    return T.Compose(
        [
            T.Resize((info.input_size, info.input_size), _INTERPOLATION[info.interpolation]),
            T.ToTensor(),
            T.Normalize(info.mean, info.std),
        ]
    )


def train_transform(info: BackboneInfo, params: FinetuneParams) -> T.Compose:
    """The fusion paper's online augmentation: flips, rotation by any angle, colour change."""
    steps = [T.Resize((info.input_size, info.input_size), _INTERPOLATION[info.interpolation])]
    if params.hflip:
        steps.append(T.RandomHorizontalFlip())
    if params.vflip:
        steps.append(T.RandomVerticalFlip())
    if params.rotation:
        steps.append(T.RandomRotation(params.rotation))
    if params.color_jitter:
        j = params.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += [T.ToTensor(), T.Normalize(info.mean, info.std)]
    return T.Compose(steps)


class ImageDataset(Dataset):
    """Image files as ``(image (3, H, W) float32, label, index)`` triples; label -1 if unknown."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | None, transform, size: int):
        self.paths = list(paths)
        self.labels = np.full(len(self.paths), -1) if labels is None else np.asarray(labels)
        self.transform = transform
        self.size = size  # decode hint: big JPEGs decode at reduced scale (draft mode)

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, rows: np.ndarray, transform, size: int
    ) -> ImageDataset:
        """Manifest ``rows`` in the given order; the index returned is the position in ``rows``."""
        return cls(
            [manifest.image_path(int(r)) for r in rows], manifest.label[rows], transform, size
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image = load_image(self.paths[i], size=self.size)
        return self.transform(image), int(self.labels[i]), i
