"""Loader preprocessing: uint8 per image in the workers, normalization per batch."""

import numpy as np
import pytest
import torch
from conftest import params_of
from PIL import Image
from torchvision import transforms as T

from pipeline.backbones import backbone_info
from pipeline.config import FinetuneParams
from pipeline.transforms import ImageDataset, eval_transform, model_input, train_transform

INFO = backbone_info("tf_efficientnet_lite0", 32)
CPU = torch.device("cpu")


@pytest.fixture
def images(tmp_path):
    """One RGB, one 8-bit grey and one 16-bit grey PNG of odd sizes."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (45, 30), dtype=np.uint8)).save(tmp_path / "grey.png")
    deep = rng.integers(0, 65536, (20, 20), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    return [tmp_path / n for n in ("rgb.png", "grey.png", "deep.png")]


def test_dataset_yields_three_channel_uint8_for_every_source(images):
    dataset = ImageDataset(images, [0, 1, 0], eval_transform(INFO), INFO.input_size)
    for i in range(len(images)):
        image, label, index = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert (label, index) == ([0, 1, 0][i], i)
    grey, _, _ = dataset[1]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])


def test_batch_normalization_matches_per_image_float_preprocessing(images):
    """model_input(uint8 batch) == ToTensor + Normalize on the RGB image, per image."""
    dataset = ImageDataset(images, None, eval_transform(INFO), INFO.input_size)
    batch = torch.stack([dataset[i][0] for i in range(len(images))])
    x = model_input(batch, INFO, CPU)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    reference = T.Compose([T.ToTensor(), T.Normalize(INFO.mean, INFO.std)])
    for i in range(len(images)):
        rgb = Image.fromarray(batch[i].permute(1, 2, 0).numpy())
        torch.testing.assert_close(x[i], reference(rgb), rtol=0, atol=1e-5)


def test_resizing_grey_in_one_channel_equals_resizing_it_replicated(images):
    """The grey shortcut changes speed, not pixels."""
    dataset = ImageDataset(images[1:2], None, eval_transform(INFO), INFO.input_size)
    replicated = eval_transform(INFO)(Image.open(images[1]).convert("RGB"))
    assert torch.equal(dataset[0][0], replicated)


def test_train_transform_gives_uint8_at_input_size(images):
    params = params_of(FinetuneParams, "finetune", rotation=180, color_jitter=0.2)
    dataset = ImageDataset(images, None, train_transform(INFO, params), INFO.input_size)
    for i in range(len(images)):
        image = dataset[i][0]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
