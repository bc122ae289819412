"""Preprocessing built from a backbone's own config, and the dataset that feeds it images.

Images are resized to (size, size) without cropping: defects often sit at the borders.
Loader workers do the per-image work on uint8 (grey images in one channel) and ship uint8
batches: a quarter of the bytes to copy and pin. `model_input` normalizes a whole batch
where the model runs, in one vectorized op.
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
    """Deterministic: resize, to a uint8 tensor (C, H, W)."""
    return T.Compose(
        [
            T.Resize((info.input_size, info.input_size), _INTERPOLATION[info.interpolation]),
            T.PILToTensor(),
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
    steps.append(T.PILToTensor())
    return T.Compose(steps)


def model_input(images: torch.Tensor, info: BackboneInfo, device: torch.device) -> torch.Tensor:
    """A loader batch (B, 3, H, W) uint8 -> float32 normalized with the backbone's mean/std,
    on ``device`` in channels-last (faster convolutions on CUDA and on these CPUs alike)."""
    x = images.to(device, non_blocking=device.type == "cuda", memory_format=torch.channels_last)
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1) * 255
    return (x.float() - mean) / std


class ImageDataset(Dataset):
    """Image files as ``(image (3, H, W) uint8, label, index)`` triples; label -1 if unknown."""

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
        image = self.transform(load_image(self.paths[i], size=self.size, keep_gray=True))
        return image.expand(3, -1, -1), int(self.labels[i]), i
