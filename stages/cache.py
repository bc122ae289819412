"""`defuse cache info|verify PATH...`: look inside feature caches and check them."""

import json
from pathlib import Path

import click

from pipeline import layout
from stages import options

_paths = click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
_manifest = options.path_option(
    "--manifest",
    layout.MANIFEST,
    "Check consistency with this manifest (skipped when the file is absent).",
)
_models = options.path_option(
    "--models",
    layout.MODELS,
    "Folder of checkpoints; each cache is checked against <models>/<backbone>/model.json.",
)


def _context(path: Path, manifest: Path, models: Path):
    """The manifest and the checkpoint sha256 a cache should agree with, where present."""
    from pipeline.cache import cache_info
    from pipeline.checkpoint import read_sidecar
    from pipeline.data import read_manifest

    backbone = cache_info(path)["attrs"]["backbone"]
    ckpt = layout.checkpoint_dir(backbone, models)
    sha = read_sidecar(ckpt)["weights_sha256"] if (ckpt / "model.json").is_file() else None
    return (read_manifest(manifest) if manifest.is_file() else None), sha


@click.group()
def cache():
    """Inspect and verify HDF5 feature caches (data only: nothing in them is executed)."""


@cache.command()
@_paths
@_manifest
@_models
def info(paths, manifest, models):
    """Print each cache's metadata, shape, dtype, size and consistency with the current
    manifest and checkpoint."""
    from pipeline.cache import cache_info, verify_cache

    for path in paths:
        meta = cache_info(path)
        click.echo(f"{path}")
        click.echo(json.dumps(meta, indent=2, default=str))
        problems = verify_cache(path, *_context(path, manifest, models))
        click.echo(
            "  consistent with manifest and checkpoint" if not problems else "  INCONSISTENT:"
        )
        for problem in problems:
            click.echo(f"    - {problem}")


@cache.command()
@_paths
@_manifest
@_models
def verify(paths, manifest, models):
    """Re-hash and check every cache; exit 1 on any problem."""
    from pipeline.cache import verify_cache
    from pipeline.errors import DefuseError

    bad = 0
    for path in paths:
        try:
            problems = verify_cache(path, *_context(path, manifest, models))
        except DefuseError as exc:  # a cache that cannot even be opened is one more failure
            problems = [str(exc)]
        bad += bool(problems)
        click.echo(f"{'OK  ' if not problems else 'FAIL'} {path}")
        for problem in problems:
            click.echo(f"     - {problem}")
    if bad:
        raise click.ClickException(f"{bad} of {len(paths)} cache(s) failed verification.")
