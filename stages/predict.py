"""`defuse predict IMAGES_OR_FOLDER...`: classify new images with the fused model."""

import csv
import json
from pathlib import Path

import click

from pipeline import layout
from stages import options


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--head", default=None, help="Fusion head to use [evaluate.final_head in params.yaml]."
)
@options.heads
@options.models
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("predictions.csv"),
    show_default=True,
    help="A .csv or .json file.",
)
@options.params
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
def predict(inputs, head, heads_dir, models, out, params_path, batch_size, device):
    """Classify images (files or folders) with the fine-tuned backbones and a fusion head.

    Writes one row per image: path, predicted class and one probability per class.
    Unreadable images are listed on stderr and do not stop the batch.
    """
    from pipeline.config import EvaluateParams, section
    from pipeline.predict import predict as run

    head = head or section(EvaluateParams, "evaluate", params_path).final_head
    result = run(list(inputs), layout.head_dir(head, heads_dir), models, batch_size, device)
    rows = result.rows()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        out.write_text(json.dumps(rows, indent=2) + "\n")
    else:
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=list(rows[0]) if rows else ["path", "predicted"], lineterminator="\n"
            )
            writer.writeheader()
            writer.writerows(rows)
    for _, reason in result.failures:
        click.echo(f"unreadable: {reason}", err=True)
    click.echo(
        f"{len(rows)} image(s) classified with head {head!r} -> {out}; {len(result.failures)} unreadable"
    )
