"""`defuse predict IMAGES_OR_FOLDER...`: classify new images with the fused model."""

from pathlib import Path

import click

from pipeline import layout
from stages import options


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--head",
    default=None,
    help="Fusion head to use [evaluate.final_head in params.yaml; auto: the best on val].",
)
@options.heads
@options.models
@options.path_option(
    "--images",
    layout.IMAGES,
    "Folder of image caches <backbone>.h5: images whose bytes they hold are not decoded.",
    "images_dir",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("predictions.csv"),
    show_default=True,
    help="A .csv or .json file.",
)
@options.params
@click.option("--batch-size", type=click.IntRange(min=1), help="Override extract.batch_size.")
@click.option("--device", help="Override extract.device (auto, cpu, cuda, cuda:1).")
@click.option(
    "--review-below",
    type=click.FloatRange(0, 1, min_open=True),
    metavar="P",
    help="Override review.below: flag for review the images whose top probability is below P.",
)
def predict(
    inputs, head, heads_dir, models, images_dir, out, params_path, batch_size, device, review_below
):
    """Classify images (files or folders) with the fine-tuned backbones and a fusion head.

    Images are embedded as `defuse extract` embeds them (params.yaml's `extract` section:
    TTA, dtype), by the very checkpoints whose caches the head was trained on (checked).
    Writes one row per image: path, predicted class, `review` (with a review.below) and one
    probability per class.
    Unreadable images are listed on stderr and do not stop the batch.
    """
    from pipeline.config import ExtractParams, PrepareParams, ReviewParams, section
    from pipeline.fusion.fit import final_head
    from pipeline.predict import predict as run
    from pipeline.predictions import check_output, write_predictions
    from pipeline.storage.outputs import check_file_output

    check_output(out)  # the suffix first: its message names the formats
    check_file_output(out, "--out")
    # New images are held to the bound the dataset's were checked against.
    max_pixels = section(PrepareParams, "prepare", params_path).max_pixels
    below = section(ReviewParams, "review", params_path, below=review_below).below
    head = head or final_head(params_path, heads_dir)
    params = section(ExtractParams, "extract", params_path, batch_size=batch_size, device=device)
    result = run(
        list(inputs),
        layout.head_dir(head, heads_dir),
        params,
        models,
        images_dir=images_dir,
        max_pixels=max_pixels,
        review_below=below,
    )
    write_predictions(result, out)
    for _, reason in result.failures:
        click.echo(f"unreadable: {reason}", err=True)
    click.echo(
        f"{len(result.paths)} image(s) classified with head {head!r} -> {out}; "
        f"{len(result.failures)} unreadable{result.review_summary()}"
    )
