"""The deployment runtime: classify images with an export (`defuse export`) using numpy,
Pillow and onnxruntime alone, no torch. Images are decoded and squared as defuse does
(`load_image`, `Preprocessing.square`); the graph normalises them. Writes the rows of
`defuse predict`. The export folder holds a copy of this runtime, so on its own, from inside
it: python -m pipeline.deploy . IMAGES... --out preds.csv [--review-below P]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.data.images import load_image
from pipeline.errors import CheckpointError, DataError, DefuseError
from pipeline.models.preprocessing import Preprocessing
from pipeline.predictions import Predictions, check_output, find_images, write_predictions
from pipeline.validation import check_at_least, check_probability

GRAPH, RECORD = "model.onnx", "model.json"  # what `defuse export` writes
FORMAT = 3  # model.json's layout, which this runtime reads
CARRIED = "defuse"  # the graph's metadata key holding model.json's record (all but graph_sha256)
# The files this runtime runs, packages' __init__.py included: `defuse export` copies them
# beside the graph, so the export folder classifies on its own (tests/test_layout.py checks
# this is what the runtime imports).
RUNTIME = (
    "pipeline/__init__.py",
    "pipeline/data/__init__.py",
    "pipeline/data/images.py",
    "pipeline/deploy.py",
    "pipeline/errors.py",
    "pipeline/models/__init__.py",
    "pipeline/models/preprocessing.py",
    "pipeline/predictions.py",
    "pipeline/storage/__init__.py",
    "pipeline/storage/atomic.py",
    "pipeline/validation.py",
)


@dataclass(frozen=True)
class Deployed:
    session: object  # onnxruntime.InferenceSession of the graph
    classes: list[str]
    inputs: dict[str, Preprocessing]  # graph input name -> its preprocessing, in graph order
    output: str
    max_pixels: int  # decompression-bomb bound the training images were held to
    review_below: float | None  # flag for review a top probability below this; None: no column


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def load_export(directory: Path | str, threads: int | None = None) -> Deployed:
    """The export in ``directory``, verified: model.json parses, names this format, the
    graph's sha256 is the one it records, and the graph carries the same record (so an edited
    model.json is told from the one written with the graph). CheckpointError naming the file
    otherwise."""
    import onnxruntime as ort

    directory = Path(directory)
    record_path = directory / RECORD
    try:
        record = json.loads(record_path.read_text())
        if record["format"] != FORMAT:
            raise ValueError(
                f"format {record['format']!r}, this runtime reads {FORMAT}; re-run `defuse export`"
            )
        graph = directory / record["graph"]
        inputs = {
            i["name"]: Preprocessing.from_json(i["preprocessing"], f"{record_path} {i['name']}")
            for i in record["inputs"]
        }
        classes, output, sha = list(record["classes"]), record["output"], record["graph_sha256"]
        max_pixels = int(record["max_pixels"])
        review_below = record["review_below"]
        if review_below is not None:
            if isinstance(review_below, bool) or not isinstance(review_below, int | float):
                raise ValueError(f"review_below {review_below!r} is not a number")
            check_probability("review_below", review_below)
    except (OSError, ValueError, KeyError, TypeError, DefuseError) as exc:
        raise CheckpointError(f"{record_path}: not a defuse export record ({exc})") from None
    if not graph.is_file() or _sha256(graph) != sha:
        raise CheckpointError(
            f"{graph}: missing or not the graph {record_path} records (sha256 {sha}); "
            "re-run `defuse export`."
        )
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    carried = json.loads(session.get_modelmeta().custom_metadata_map.get(CARRIED, "{}"))
    written = {k: v for k, v in record.items() if k != "graph_sha256"}
    if carried != written:
        edited = sorted(
            k for k in carried.keys() | written.keys() if carried.get(k) != written.get(k)
        )
        raise CheckpointError(
            f"{record_path}: {', '.join(edited)} differ from the record {graph} carries, so "
            "the file was edited after `defuse export`; re-run it (`--review-below` overrides "
            "the threshold)."
        )
    return Deployed(session, classes, inputs, output, max_pixels, review_below)


def prepared(
    path: Path, inputs: dict[str, Preprocessing], *, max_pixels: int
) -> dict[str, np.ndarray]:
    """Each input's (S, S, 3) uint8 square of the image at ``path``, as defuse's loaders make
    it: decoded at the input's size (JPEG draft scale), grey kept one channel while squared,
    then repeated. DataError if the file cannot be decoded."""
    decoded, out = {}, {}
    for name, prep in inputs.items():
        size = prep.input_size
        if size not in decoded:
            decoded[size] = load_image(path, max_pixels=max_pixels, size=size, keep_gray=True)
        pixels = np.asarray(prep.square(decoded[size]), dtype=np.uint8)
        out[name] = np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels
    return out


def classify(deployed: Deployed, inputs: list[Path], batch_size: int = 32) -> Predictions:
    """Class probabilities of every readable image under ``inputs`` (files or folders), those
    below the export's `review_below` flagged; unreadable ones are listed in ``failures``.
    DataError when none is readable."""
    found = find_images(inputs)
    if not found:
        raise DataError(f"No files under {', '.join(map(str, inputs))}: nothing to classify.")
    paths, failures, probas, batch = [], [], [], []
    for i, path in enumerate(found):
        try:
            batch.append(prepared(path, deployed.inputs, max_pixels=deployed.max_pixels))
            paths.append(path)
        except DataError as exc:
            failures.append((path, str(exc)))
        if batch and (len(batch) == batch_size or i == len(found) - 1):
            feed = {n: np.stack([b[n] for b in batch]) for n in deployed.inputs}
            probas.append(deployed.session.run([deployed.output], feed)[0].astype(np.float64))
            batch = []
    if not paths:
        raise DataError(
            f"None of the {len(found)} file(s) under {', '.join(map(str, inputs))} is a readable "
            f"image, e.g. {failures[0][1]}"
        )
    proba = np.concatenate(probas)
    proba /= proba.sum(axis=1, keepdims=True)
    return Predictions(paths, proba, deployed.classes, failures, deployed.review_below)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.deploy", description=__doc__)
    parser.add_argument("export_dir", type=Path, help="Folder written by `defuse export`.")
    parser.add_argument("images", type=Path, nargs="+", help="Image files or folders.")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("predictions.csv"),
        help="predictions file, .csv or .json [predictions.csv]",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per run [32]")
    parser.add_argument(
        "--threads", type=int, default=None, help="onnxruntime's threads [one per core]"
    )
    parser.add_argument(
        "--review-below",
        type=float,
        metavar="P",
        help="flag for review a top probability below P [the export's review_below]",
    )
    args = parser.parse_args(argv)
    try:
        check_output(args.out)
        check_at_least("--batch-size", args.batch_size, 1)
        if args.threads is not None:
            check_at_least("--threads", args.threads, 1)
        if args.review_below is not None:  # refused before the graph is loaded
            check_probability("--review-below", args.review_below)
        deployed = load_export(args.export_dir, args.threads)
        if args.review_below is not None:
            deployed = replace(deployed, review_below=args.review_below)
        result = classify(deployed, args.images, args.batch_size)
        write_predictions(result, args.out)
    except DefuseError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    for _, reason in result.failures:
        print(f"unreadable: {reason}", file=sys.stderr)
    print(
        f"{len(result.paths)} image(s) classified -> {args.out}; {len(result.failures)} unreadable"
        f"{result.review_summary()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
