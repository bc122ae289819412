"""The preprocessing record: canonical JSON, validation naming the field, and a Pillow-only
square that equals torchvision's resize / crop / pad pixel for pixel."""

import json

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from pipeline.errors import ConfigError
from pipeline.models.preprocessing import INTERPOLATIONS, RESIZE_MODES, Preprocessing

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _record(**changes) -> Preprocessing:
    fields = dict(input_size=16, resize="stretch", mean=MEAN, std=STD, interpolation="bilinear")
    return Preprocessing(**(fields | changes))


def test_json_round_trip_is_canonical():
    p = _record(resize="letterbox")
    text = p.to_json()
    assert Preprocessing.from_json(text) == p
    assert Preprocessing.from_json(json.loads(text)) == p
    assert text == Preprocessing.from_json(text).to_json()  # same record, same bytes
    assert " " not in text and list(json.loads(text)) == sorted(json.loads(text))


@pytest.mark.parametrize(
    "change, says",
    [
        (dict(input_size=0), "input_size"),
        (dict(resize="squash"), "resize"),
        (dict(interpolation="lanczos"), "interpolation"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
        (dict(mean=(0.5, float("nan"), 0.5)), "mean"),
    ],
)
def test_bad_fields_are_named(change, says):
    with pytest.raises(ConfigError, match=says):
        _record(**change)


def test_from_json_names_where_and_refuses_other_fields():
    data = json.loads(_record().to_json()) | {"crop_pct": 0.9}
    with pytest.raises(ConfigError, match=r"model\.json.*crop_pct"):
        Preprocessing.from_json(json.dumps(data), where="model.json")
    with pytest.raises(ConfigError, match=r"cache\.h5"):
        Preprocessing.from_json("{not json", where="cache.h5")


def _torchvision_square(p: Preprocessing, image: Image.Image) -> Image.Image:
    """The same square built from torchvision's transforms, the reference."""
    mode = getattr(T.InterpolationMode, p.interpolation.upper())
    size = p.input_size
    if p.resize == "stretch":
        return T.Resize((size, size), mode)(image)
    if p.resize == "center_crop":
        return T.CenterCrop(size)(T.Resize(size, mode)(image))
    scale = size / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    image = F.resize(image, [h, w], mode)
    fill = (
        round(255 * sum(p.mean) / 3) if image.mode == "L" else tuple(round(255 * m) for m in p.mean)
    )
    left, top = (size - w) // 2, (size - h) // 2
    return F.pad(image, [left, top, size - w - left, size - h - top], fill=fill)


@pytest.mark.parametrize("resize", RESIZE_MODES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("shape", [(23, 37), (40, 17), (9, 9), (16, 16), (5, 61)])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_square_equals_torchvision(resize, interpolation, shape, mode):
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, (*shape, 3) if mode == "RGB" else shape, dtype=np.uint8)
    image = Image.fromarray(pixels)
    p = _record(resize=resize, interpolation=interpolation)
    got = p.square(image)
    assert got.size == (16, 16) and got.mode == mode
    assert np.array_equal(np.asarray(got), np.asarray(_torchvision_square(p, image)))


def test_a_square_of_the_right_size_is_left_alone():
    image = Image.new("RGB", (16, 16), (1, 2, 3))
    for resize in RESIZE_MODES:
        assert _record(resize=resize).square(image) is image
