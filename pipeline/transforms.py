"""Preprocessing built from a backbone's own config, and the dataset that feeds it images.

Images meet the square input as the checkpoint says (`BackboneInfo.resize`): stretched to
(size, size) by default, which crops nothing (defects often sit at the borders), letterboxed,
or center-cropped.
Loader workers do the per-image work on uint8 (grey images in one channel) and ship uint8
batches: a quarter of the bytes to copy and pin. `model_input` normalizes a whole batch
where the model runs, in one vectorized op.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as F

from pipeline.backbones import BackboneInfo
from pipeline.config import RESIZE_MODES, FinetuneParams
from pipeline.data import Manifest, load_image
from pipeline.errors import ConfigError

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


class Letterbox:
    """Scale the longer side to ``size`` keeping the aspect ratio, then pad the shorter one on
    both sides to a (size, size) square with the backbone's mean colour, which normalises to
    zero: the padding reads as "no signal", not as a dark defect. Grey images are padded with
    the mean of the three channel means."""

    def __init__(self, size: int, interpolation: T.InterpolationMode, mean: Sequence[float]):
        self.size, self.interpolation = size, interpolation
        self.fill_rgb = tuple(round(255 * m) for m in mean)
        self.fill_grey = round(255 * sum(mean) / len(mean))

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = self.size / max(width, height)
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        image = F.resize(image, [h, w], self.interpolation)
        left, top = (self.size - w) // 2, (self.size - h) // 2
        fill = self.fill_grey if image.mode == "L" else self.fill_rgb
        return F.pad(image, [left, top, self.size - w - left, self.size - h - top], fill=fill)


def _to_square(info: BackboneInfo) -> list:
    """The steps that bring any image to (input_size, input_size) per ``info.resize``."""
    size, interpolation = info.input_size, _INTERPOLATION[info.interpolation]
    if info.resize == "stretch":
        return [T.Resize((size, size), interpolation)]
    if info.resize == "letterbox":
        return [Letterbox(size, interpolation, info.mean)]
    if info.resize == "center_crop":  # shorter side to size, the middle of the longer one
        return [T.Resize(size, interpolation), T.CenterCrop(size)]
    raise ConfigError(f"resize must be one of {list(RESIZE_MODES)}. Got {info.resize!r} instead.")


def eval_transform(info: BackboneInfo) -> T.Compose:
    """Deterministic: to the square input, to a uint8 tensor (C, H, W)."""
    return T.Compose([*_to_square(info), T.PILToTensor()])


def train_transform(info: BackboneInfo, params: FinetuneParams) -> T.Compose:
    """The fusion paper's online augmentation: flips, rotation by any angle, colour change."""
    steps = _to_square(info)
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
