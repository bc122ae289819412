"""What a classifier of new images writes: one row per image (path, predicted class, whether
a person should review it, one probability per class) as CSV or JSON, and the files it is
given. Torch-free: `defuse predict` and the deployment runtime (`pipeline.deploy`) write
through it alike."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.images import check_regular_file, walk_files
from pipeline.errors import DataError
from pipeline.storage.atomic import write_text


@dataclass(frozen=True)
class Predictions:
    paths: list[Path]  # images classified, in input order
    proba: np.ndarray  # (n_images, n_classes)
    class_names: list[str]
    failures: list[tuple[Path, str]]  # (path, reason) of images that could not be read
    review_below: float | None = None  # flag a top probability below it; None: no column

    def flagged(self) -> np.ndarray:
        """(n_images,) bool: the images whose top probability is below `review_below` (none
        when it is None)."""
        if self.review_below is None:
            return np.zeros(len(self.paths), dtype=bool)
        return self.proba.max(axis=1) < self.review_below

    def review_summary(self) -> str:
        """'; K flagged for review (...)', the end of a closing line; '' without `review_below`."""
        if self.review_below is None:
            return ""
        return (
            f"; {self.flagged().sum()} flagged for review (top probability < {self.review_below})"
        )

    def rows(self) -> list[dict]:
        """One dict per image: path, predicted class, `review` (only with a `review_below`),
        one probability column per class."""
        review = self.review_below is not None
        return [
            {"path": str(p), "predicted": self.class_names[int(np.argmax(pr))]}
            | ({"review": bool(flag)} if review else {})
            | {f"p_{c}": round(float(v), 6) for c, v in zip(self.class_names, pr, strict=True)}
            for p, pr, flag in zip(self.paths, self.proba, self.flagged(), strict=True)
        ]


def find_images(inputs: list[Path]) -> list[Path]:
    """Files as given, and every non-hidden file under given folders, sorted; DataError
    naming the first that is missing or not a regular file (a FIFO, a device, a link to one)."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += walk_files(item)
        elif item.exists() or item.is_symlink():
            check_regular_file(item)
            found.append(item)
        else:
            raise DataError(f"{item}: no such file or folder.")
    return found


def check_output(out: Path) -> None:
    """Refuse an ``out`` that `write_predictions` cannot write, before any image is read."""
    if out.is_dir():
        raise DataError(f"--out {out}: a folder, not a file; name a file ending in .csv or .json.")
    if out.suffix not in (".csv", ".json"):
        raise DataError(
            f"--out {out}: unknown format {out.suffix or '(no suffix)'!r}; use .csv or .json."
        )


def write_predictions(predictions: Predictions, out: Path) -> Path:
    """``out`` (.csv or .json, see `check_output`) with one row per classified image."""
    check_output(out)
    rows = predictions.rows()
    if out.suffix == ".json":
        return write_text(out, json.dumps(rows, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(out, buf.getvalue())
