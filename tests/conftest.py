"""Shared fixtures: tiny real image files made in tmp_path."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def image_folder(tmp_path):
    """Factory: ``make({"a": 6, "b": 6})`` writes root/<class>/<i>.png, every image distinct."""
    rng = np.random.default_rng(0)  # one stream per test, so no two images repeat

    def make(counts: dict[str, int], root: Path | None = None, size: int = 8) -> Path:
        root = root or tmp_path / "images"
        for name, n in counts.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
        return root

    return make
