"""The preprocessing record: how an image becomes a backbone's input (square size, resize mode,
mean, std, interpolation, channel order), like timm's `pretrained_cfg`. One frozen record that
the checkpoint sidecar, the image cache, the feature cache, the head's pins and the export store
whole (`to_json`) and compare whole. Imports neither torch nor the backbone registry.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from PIL import Image

from pipeline.errors import ConfigError

RESIZE_MODES = ("stretch", "letterbox", "center_crop")  # how a non-square image meets the input
_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
INTERPOLATIONS = tuple(_FILTERS)
CHANNELS = ("RGB",)  # the order the network takes; a grey image is repeated into all three


@dataclass(frozen=True)
class Preprocessing:
    input_size: int  # square side in pixels
    resize: str  # one of RESIZE_MODES
    mean: tuple[float, float, float]  # per channel, on the [0, 1] scale
    std: tuple[float, float, float]
    interpolation: str  # one of INTERPOLATIONS
    channels: str = "RGB"

    def __post_init__(self):
        _check(self)

    def to_json(self) -> str:
        """Canonical JSON text: sorted keys, no spaces, so equal records give equal bytes."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def square(self, image: Image.Image) -> Image.Image:
        """``image`` (L or RGB) brought to (input_size, input_size) per ``resize``, in Pillow
        alone (the deployment runtime has no torch); pixel for pixel what torchvision's Resize /
        CenterCrop / Pad make of it (a test checks). An image already that square is returned
        as it is: every mode maps it to itself, and the image cache's rows are such squares.

        stretch: to the square, cropping nothing (defects often sit at the borders);
        letterbox: the longer side to the square, the shorter padded on both sides with the
        mean colour, which normalises to zero ("no signal", not a dark defect); a grey image is
        padded with the mean of the three channel means;
        center_crop: the shorter side to the square, the middle of the longer one kept.
        """
        size, resample = self.input_size, _FILTERS[self.interpolation]
        width, height = image.size
        if (width, height) == (size, size):
            return image
        if self.resize == "stretch":
            return image.resize((size, size), resample)
        if self.resize == "letterbox":
            scale = size / max(width, height)
            w, h = max(1, round(width * scale)), max(1, round(height * scale))
            fill = (
                round(255 * sum(self.mean) / 3)
                if image.mode == "L"
                else tuple(round(255 * m) for m in self.mean)
            )
            canvas = Image.new(image.mode, (size, size), fill)
            canvas.paste(image.resize((w, h), resample), ((size - w) // 2, (size - h) // 2))
            return canvas
        # center_crop: torchvision truncates the longer side and rounds the crop offsets
        short, long = min(width, height), max(width, height)
        scaled = int(size * long / short)
        w, h = (size, scaled) if width <= height else (scaled, size)
        image = image.resize((w, h), resample)
        left, top = round((w - size) / 2), round((h - size) / 2)
        return image.crop((left, top, left + size, top + size))

    @classmethod
    def from_json(cls, text: str | dict, where: str = "preprocessing") -> Preprocessing:
        """The record from `to_json`'s text (or its dict); ConfigError naming ``where`` and the
        field at fault otherwise."""
        try:
            data = json.loads(text) if isinstance(text, str | bytes) else dict(text)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: not a preprocessing record ({e})") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ConfigError(
                f"{where}: a preprocessing record has fields {sorted(names)}; got {got}"
            )
        try:
            return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None


def _check(p: Preprocessing) -> None:
    if not isinstance(p.input_size, int) or isinstance(p.input_size, bool) or p.input_size < 1:
        raise ConfigError(f"input_size must be an int >= 1. Got {p.input_size!r} instead.")
    for name, allowed in (
        ("resize", RESIZE_MODES),
        ("interpolation", INTERPOLATIONS),
        ("channels", CHANNELS),
    ):
        if getattr(p, name) not in allowed:
            raise ConfigError(
                f"{name} must be one of {list(allowed)}. Got {getattr(p, name)!r} instead."
            )
    for name in ("mean", "std"):
        v = getattr(p, name)
        ok = isinstance(v, tuple) and len(v) == 3
        ok = ok and all(isinstance(x, float | int) and math.isfinite(x) for x in v)
        if not ok or (name == "std" and min(v) <= 0):
            raise ConfigError(f"{name} must be 3 finite numbers (std > 0). Got {v!r} instead.")
