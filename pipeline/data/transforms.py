"""Preprocessing built from a backbone's own config, and the dataset that feeds it images.

Images meet the square input as the checkpoint says (`BackboneInfo.resize`): stretched to
(size, size) by default, which crops nothing (defects often sit at the borders), letterboxed,
or center-cropped. `ToSquare` leaves an image already at that square alone, so the image
cache's rows (`defuse decode`: each image decoded and squared once) go through the same
transforms as a freshly decoded file and come out the same.
Loader workers do the per-image work on uint8 (grey images in one channel) and ship uint8
batches: a quarter of the bytes to copy and pin. `model_input` normalizes a whole batch
where the model runs, in one vectorized op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as F

from pipeline.config import RESIZE_MODES, FinetuneParams
from pipeline.data.images import load_image
from pipeline.data.manifest import Manifest
from pipeline.errors import ConfigError
from pipeline.models.registry import BackboneInfo, backbone_info

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


def target_info(backbone: str, params: FinetuneParams) -> BackboneInfo:
    """What ``backbone`` is fine-tuned on under ``params``: its preprocessing at
    ``params.input_size`` (None: native) and ``params.resize``. The checkpoint records it
    for extract and predict; `defuse decode` squares the images to it."""
    return replace(backbone_info(backbone, params.input_size), resize=params.resize)


class ToSquare:
    """Any image to (input_size, input_size) per ``info.resize``. An image already that
    square is returned as it is: every mode maps it to itself (a test checks), and the image
    cache's rows are such squares."""

    def __init__(self, info: BackboneInfo):
        self.size = info.input_size
        self.steps = T.Compose(_to_square(info))

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.size == (self.size, self.size) else self.steps(image)


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
    return T.Compose([ToSquare(info), T.PILToTensor()])


def train_transform(info: BackboneInfo, params: FinetuneParams) -> T.Compose:
    """The fusion paper's online augmentation: flips, rotation by any angle, colour change."""
    steps = [ToSquare(info)]
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
