"""Options several stages share, declared once; each defaults to pipeline/layout.py."""

from pathlib import Path

import click

from pipeline import layout
from pipeline.config import PARAMS_FILE


def path_option(flag: str, default: Path, help: str, dest: str | None = None):
    names = (flag, dest) if dest else (flag,)
    return click.option(
        *names, type=click.Path(path_type=Path), default=default, show_default=True, help=help
    )


manifest = path_option("--manifest", layout.MANIFEST, "The manifest written by `defuse prepare`.")
params = path_option(
    "--params", PARAMS_FILE, "The params file whose sections are read.", "params_path"
)
features = path_option(
    "--features", layout.FEATURES, "Folder of feature caches <backbone>.h5.", "features_dir"
)
models = path_option("--models", layout.MODELS, "Folder of fine-tuned checkpoints <backbone>/.")
heads = path_option("--heads", layout.HEADS, "Folder of fitted heads <head>/.", "heads_dir")
reports = path_option("--reports", layout.REPORTS, "Folder for metrics, plot data and figures.")
images = click.option(
    "--images",
    type=click.Path(path_type=Path),
    help="Image cache written by `defuse decode` [cache/images/BACKBONE.h5 if present, else "
    "the images are decoded from their files].",
)


def image_cache(given: Path | None, backbone: str) -> Path | None:
    """--images if given; else the layout's image cache of ``backbone`` if it exists; else
    None, said on stderr: the images are then decoded from their files (slower, same pixels)."""
    path = given or layout.image_cache(backbone)
    if given or path.is_file():
        return path
    click.echo(
        f"No image cache {path}: decoding every image from its file "
        f"(`defuse decode {backbone}` decodes them once).",
        err=True,
    )
    return None
