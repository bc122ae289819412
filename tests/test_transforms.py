"""Loader preprocessing: uint8 per image in the workers, normalization per batch."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import params_of
from PIL import Image
from torchvision import transforms as T

from pipeline.config import FinetuneParams
from pipeline.data.transforms import ImageDataset, eval_transform, model_input, train_transform
from pipeline.errors import ConfigError
from pipeline.models.preprocessing import RESIZE_MODES
from pipeline.models.registry import backbone_info

INFO = backbone_info("tf_efficientnet_lite0", 32).preprocessing
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
    dataset = ImageDataset(
        images, [0, 1, 0], eval_transform(INFO), INFO.input_size, max_pixels=10**8
    )
    for i in range(len(images)):
        image, label, index = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert (label, index) == ([0, 1, 0][i], i)
    grey, _, _ = dataset[1]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])


def test_batch_normalization_matches_per_image_float_preprocessing(images):
    """model_input(uint8 batch) == ToTensor + Normalize on the RGB image, per image."""
    dataset = ImageDataset(images, None, eval_transform(INFO), INFO.input_size, max_pixels=10**8)
    batch = torch.stack([dataset[i][0] for i in range(len(images))])
    x = model_input(batch, INFO, CPU)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    reference = T.Compose([T.ToTensor(), T.Normalize(INFO.mean, INFO.std)])
    for i in range(len(images)):
        rgb = Image.fromarray(batch[i].permute(1, 2, 0).numpy())
        torch.testing.assert_close(x[i], reference(rgb), rtol=0, atol=1e-5)


def test_resizing_grey_in_one_channel_equals_resizing_it_replicated(images):
    """The grey shortcut changes speed, not pixels."""
    dataset = ImageDataset(
        images[1:2], None, eval_transform(INFO), INFO.input_size, max_pixels=10**8
    )
    replicated = eval_transform(INFO)(Image.open(images[1]).convert("RGB"))
    assert torch.equal(dataset[0][0], replicated)


def test_train_transform_gives_uint8_at_input_size(images):
    params = params_of(FinetuneParams, "finetune", rotation=180, color_jitter=0.2)
    dataset = ImageDataset(
        images, None, train_transform(INFO, params), INFO.input_size, max_pixels=10**8
    )
    for i in range(len(images)):
        image = dataset[i][0]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)


# --- finetune.resize: how a non-square image meets the square input ----------------------------


def _bands():
    """80 x 40: red | green (the middle half) | blue, as RGB and as grey."""
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :20], pixels[:, 20:60], pixels[:, 60:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    return Image.fromarray(pixels)


def _square(mode, image):
    return eval_transform(replace(INFO, resize=mode))(image)


def test_stretch_keeps_every_pixel_column():
    out = _square("stretch", _bands())
    assert out.shape == (3, 32, 32)
    assert out[:, :, 0].tolist() == [[255] * 32, [0] * 32, [0] * 32]  # red reaches the left
    assert out[:, :, 31].tolist() == [[0] * 32, [0] * 32, [255] * 32]  # and blue the right


def test_letterbox_pads_top_and_bottom_with_the_mean_colour():
    out = _square("letterbox", _bands())
    fill = [round(255 * m) for m in INFO.mean]
    assert out.shape == (3, 32, 32)
    # 80 x 40 -> 32 x 16, centred: 8 rows of padding above and below
    for rows in (out[:, :8], out[:, 24:]):
        assert (rows == torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1)).all()
    assert out[:, 8:24, 0].T.tolist() == [[255, 0, 0]] * 16
    assert out[:, 8:24, 31].T.tolist() == [[0, 0, 255]] * 16
    grey = _square("letterbox", _bands().convert("L"))
    assert grey.shape == (1, 32, 32)
    assert (grey[:, :8] == round(255 * sum(INFO.mean) / 3)).all()


def test_center_crop_keeps_the_middle_of_the_longer_side():
    out = _square("center_crop", _bands()).int()
    assert out.shape == (3, 32, 32)
    # 80 x 40 -> 64 x 32, the middle 32 columns: the green half; only the edge columns blend
    assert (out[1, :, 1:-1] == 255).all() and (out[0, :, 1:-1] == 0).all()
    assert (out[2, :, 1:-1] == 0).all() and out[0, :, 0].max() < 32


def test_train_transform_brings_the_image_to_the_square_the_same_way():
    params = params_of(
        FinetuneParams, "finetune", hflip=False, vflip=False, rotation=0, color_jitter=0
    )
    for mode in RESIZE_MODES:
        info = replace(INFO, resize=mode)
        image = _bands()
        assert torch.equal(train_transform(info, params)(image), eval_transform(info)(image))


def test_unknown_resize_mode_is_refused():
    with pytest.raises(ConfigError, match=r"resize must be one of .*'stretch'.*Got 'fit'"):
        replace(INFO, resize="fit")


def test_an_image_already_square_at_the_size_is_left_as_it_is_by_every_mode():
    """What lets the image cache's squares go through the same transforms unchanged."""
    square = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    for mode in RESIZE_MODES:
        info = replace(INFO, resize=mode)
        steps = T.Compose([*_torchvision_square(info), T.PILToTensor()])  # without the shortcut
        assert torch.equal(steps(square), T.PILToTensor()(square)), mode
        assert torch.equal(eval_transform(info)(square), T.PILToTensor()(square)), mode


def _torchvision_square(p):
    """torchvision's steps to the square, which `Preprocessing.square` reproduces."""
    size, mode = p.input_size, T.InterpolationMode(p.interpolation)
    if p.resize == "stretch":
        return [T.Resize((size, size), mode)]
    if p.resize == "center_crop":
        return [T.Resize(size, mode), T.CenterCrop(size)]
    return [T.Resize(size, mode), T.Pad(0)]  # letterbox: a square needs no padding
