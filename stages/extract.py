"""`defuse extract BACKBONE`: the extract@<backbone> stage."""

from pathlib import Path

import click

from pipeline import layout
from stages import options


@click.command()
@click.argument("backbone")
@options.manifest
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    help="Checkpoint folder [cache/models/BACKBONE].",
)
@click.option(
    "--out", type=click.Path(path_type=Path), help="Feature cache [cache/features/BACKBONE.h5]."
)
@options.images
@options.params
@click.option("--dtype", type=click.Choice(["float32", "float16"]), help="Override extract.dtype.")
@click.option("--tta/--no-tta", default=None, help="Override extract.tta (mean over flips).")
@click.option("--device", help="Override extract.device.")
def extract(backbone, manifest, checkpoint, out, images, params_path, dtype, tta, device):
    """Write BACKBONE's penultimate embeddings and logits for every manifest image.

    Eval preprocessing of the checkpoint (resize, no crop, no augmentation), on the squares
    of BACKBONE's image cache (`defuse decode BACKBONE`). Samples whose
    rows are already in the cache with the same checkpoint and preprocessing are reused.
    The file is written under a temporary name and renamed only when complete. Under
    torchrun the processes share the new samples by whole batches and rank 0 writes the file,
    byte-identical to a single-process run's.
    """
    from pipeline import distributed
    from pipeline.config import ExtractParams, section
    from pipeline.data.manifest import read_manifest
    from pipeline.extract import extract as run
    from pipeline.storage.outputs import check_file_output

    out = check_file_output(out or layout.feature_cache(backbone), "--out")
    params = section(ExtractParams, "extract", params_path, dtype=dtype, tta=tta, device=device)
    result = run(
        read_manifest(manifest),
        checkpoint or layout.checkpoint_dir(backbone),
        out,
        params,
        images=options.image_cache(images, backbone),
    )
    if distributed.world().is_main:
        click.echo(
            f"{result.path}: {result.n_rows} rows ({result.n_new} computed, {result.n_reused} reused)"
        )
