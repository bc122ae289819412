"""The loaders' transforms and the dataset that feeds them images.

Images meet the square input as the checkpoint's preprocessing record says
(`Preprocessing.square`: stretched to (size, size) by default, letterboxed, or
center-cropped). An image already at that square is left alone, so the image cache's rows
(`defuse decode`: each image decoded and squared once) go through the same transforms as a
freshly decoded file and come out the same.
Loader workers do the per-image work on uint8 (grey images in one channel) and ship uint8
batches: a quarter of the bytes to copy and pin. `model_input` normalizes a whole batch
where the model runs, in one vectorized op, with the record's mean and std.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from pipeline.config import FinetuneParams
from pipeline.data.images import load_image
from pipeline.data.manifest import Manifest
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.registry import BackboneInfo, backbone_info


def target_info(backbone: str, params: FinetuneParams) -> BackboneInfo:
    """What ``backbone`` is fine-tuned on under ``params``: its preprocessing at
    ``params.input_size`` (None: native) and ``params.resize``. The checkpoint records it
    for extract and predict; `defuse decode` squares the images to it."""
    info = backbone_info(backbone, params.input_size)
    return replace(info, preprocessing=replace(info.preprocessing, resize=params.resize))


def eval_transform(preprocessing: Preprocessing) -> T.Compose:
    """Deterministic: to the square input, to a uint8 tensor (C, H, W)."""
    return T.Compose([preprocessing.square, T.PILToTensor()])


def train_transform(preprocessing: Preprocessing, params: FinetuneParams) -> T.Compose:
    """The fusion paper's online augmentation: flips, rotation by any angle, colour change."""
    steps = [preprocessing.square]
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


def model_input(
    images: torch.Tensor, preprocessing: Preprocessing, device: torch.device
) -> torch.Tensor:
    """A loader batch (B, 3, H, W) uint8 -> float32 normalized with the record's mean/std,
    on ``device`` in channels-last (faster convolutions on CUDA and on these CPUs alike)."""
    x = images.to(device, non_blocking=device.type == "cuda", memory_format=torch.channels_last)
    mean = torch.tensor(preprocessing.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(preprocessing.std, device=device).view(1, -1, 1, 1) * 255
    return (x.float() - mean) / std


class ImageDataset(Dataset):
    """Image files as ``(image (3, H, W) uint8, label, index)`` triples; label -1 if unknown.

    ``squares``: the image cache's rows of these files (`pipeline.storage.image_cache.Squares`);
    an image it holds is read from there, already decoded and squared, the others (all of
    them without it) are decoded from their files.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None,
        transform,
        size: int,
        squares=None,
        *,
        max_pixels: int,
    ):
        self.paths = list(paths)
        self.labels = np.full(len(self.paths), -1) if labels is None else np.asarray(labels)
        self.transform = transform
        self.size = size  # decode hint: big JPEGs decode at reduced scale (draft mode)
        self.squares = squares
        self.max_pixels = max_pixels  # prepare.max_pixels: the decoding bound

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, rows: np.ndarray, transform, size: int, squares=None
    ) -> ImageDataset:
        """Manifest ``rows`` in the given order; the index returned is the position in ``rows``."""
        paths = [manifest.image_path(int(r)) for r in rows]
        return cls(
            paths, manifest.label[rows], transform, size, squares, max_pixels=manifest.max_pixels
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image = self.squares.image(i) if self.squares is not None else None
        if image is None:
            image = load_image(
                self.paths[i], max_pixels=self.max_pixels, size=self.size, keep_gray=True
            )
        return self.transform(image).expand(3, -1, -1), int(self.labels[i]), i
