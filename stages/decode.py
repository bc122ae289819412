"""`defuse decode BACKBONE`: the decode@<backbone> stage."""

from pathlib import Path

import click

from pipeline import layout
from stages import options


@click.command()
@click.argument("backbone")
@options.manifest
@click.option(
    "--out", type=click.Path(path_type=Path), help="Image cache [cache/images/BACKBONE.h5]."
)
@options.params
@click.option("--workers", type=int, help="Decoding processes [every core].")
def decode(backbone, manifest, out, params_path, workers):
    """Decode every manifest image once, brought to BACKBONE's square input (uint8).

    The square is the one BACKBONE is fine-tuned on: `finetune.input_size` and
    `finetune.resize` (overridden by `backbones.BACKBONE`) and the backbone's interpolation;
    `finetune`, `extract` and `predict` then read these rows instead of decoding the files.
    Rows of images already in the previous file, made for the same square, are copied;
    only new images are decoded.
    """
    from pipeline.config import finetune_params
    from pipeline.data.manifest import read_manifest
    from pipeline.data.transforms import target_info
    from pipeline.storage.image_cache import decode_images
    from pipeline.storage.outputs import check_file_output

    out = check_file_output(out or layout.image_cache(backbone), "--out")
    info = target_info(backbone, finetune_params(backbone, params_path))
    prep = info.preprocessing
    result = decode_images(read_manifest(manifest), backbone, prep, out, workers)
    click.echo(
        f"{result.path}: {result.n_rows} rows ({result.n_new} decoded, "
        f"{result.n_reused} reused) of {info.preprocessing.input_size} px, {info.preprocessing.resize}"
    )
