"""`defuse export`: the export stage."""

from pathlib import Path

import click

from pipeline import layout
from stages import options


@click.command()
@click.option(
    "--head", default=None, help="Fusion head to export [evaluate.final_head; auto: best on val]."
)
@options.heads
@options.models
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=layout.EXPORT,
    show_default=True,
    help="Folder for model.onnx, model.json and the runtime (an earlier export there is "
    "replaced whole).",
)
@options.params
def export(head, heads_dir, models, out, params_path):
    """Export the fused model (backbones, block treatment, head) as one ONNX graph.

    Its inputs are each backbone's squared uint8 image (B, S, S, 3), normalised inside the
    graph; its output the class probabilities. model.json beside it holds the classes,
    each input's preprocessing record, review.below and the sha256 of the checkpoints, the
    head files and the graph. The checkpoints must be those the head's caches were made
    with; the graph's probabilities must match torch's within 1e-4, or nothing is written.
    The folder also holds the runtime (`pipeline.deploy` and the few modules it imports):
    copied anywhere with numpy, Pillow and onnxruntime (no torch), `python -m pipeline.deploy
    . IMAGES...` run inside it classifies images.
    """
    from pipeline.config import PrepareParams, ReviewParams, section
    from pipeline.export import EXPORT_FOLDER, GRAPH
    from pipeline.export import export as run
    from pipeline.fusion.fit import final_head
    from pipeline.storage.outputs import check_folder_output

    out = check_folder_output(out, "--out", EXPORT_FOLDER)
    head = head or final_head(params_path, heads_dir)
    max_pixels = section(PrepareParams, "prepare", params_path).max_pixels
    below = section(ReviewParams, "review", params_path).below
    record = run(
        layout.head_dir(head, heads_dir), models, out, max_pixels=max_pixels, review_below=below
    )
    names = ", ".join(
        f"{i['name']} ({i['preprocessing']['input_size']} px)" for i in record["inputs"]
    )
    click.echo(f"Exported head {head!r} on {names} -> {out / GRAPH}")
    click.echo(
        f"Copy {out}/ where the images are (numpy, Pillow and onnxruntime; no torch) and run, "
        "inside the copy: python -m pipeline.deploy . IMAGES... --out predictions.csv"
    )
