"""`defuse cache info|verify PATH...`: look inside feature and image caches and check them."""

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


def _problems(path: Path, manifest: Path, models: Path) -> list[str]:
    """What keeps a feature or image cache from agreeing with the manifest (and, for a feature
    cache, its checkpoint), where those are present; [] when it is sound."""
    from pipeline.data.manifest import read_manifest
    from pipeline.models.checkpoint import read_record
    from pipeline.storage.feature_cache import cache_info, verify_cache
    from pipeline.storage.image_cache import is_image_cache, verify_image_cache

    man = read_manifest(manifest) if manifest.is_file() else None
    if is_image_cache(path):
        return verify_image_cache(path, man)
    backbone = cache_info(path)["attrs"]["backbone"]
    ckpt = layout.checkpoint_dir(backbone, models)
    sha = read_record(ckpt).weights_sha256 if (ckpt / "model.json").is_file() else None
    return verify_cache(path, man, sha)


@click.group()
def cache():
    """Inspect and verify HDF5 feature caches and image caches (data only: nothing in them is
    executed)."""


@cache.command()
@_paths
@_manifest
@_models
def info(paths, manifest, models):
    """Print each cache's metadata, shape, dtype, size and consistency with the current
    manifest and checkpoint (an image cache: with the manifest)."""
    from pipeline.storage.feature_cache import cache_info
    from pipeline.storage.image_cache import image_cache_info, is_image_cache

    for path in paths:
        images = is_image_cache(path)
        meta = image_cache_info(path) if images else cache_info(path)
        # the preprocessing record is stored as JSON text: shown as the object it is
        meta["attrs"]["preprocessing"] = json.loads(meta["attrs"]["preprocessing"])
        click.echo(f"{path}")
        click.echo(json.dumps(meta, indent=2, default=str))
        problems = _problems(path, manifest, models)
        agrees = "manifest" if images else "manifest and checkpoint"
        click.echo(f"  consistent with {agrees}" if not problems else "  INCONSISTENT:")
        for problem in problems:
            click.echo(f"    - {problem}")


@cache.command()
@_paths
@_manifest
@_models
def verify(paths, manifest, models):
    """Recompute every dataset's digest and check every cache; exit 1 on any problem."""
    from pipeline.errors import DefuseError

    bad = 0
    for path in paths:
        try:
            problems = _problems(path, manifest, models)
        except DefuseError as exc:  # a cache that cannot even be opened is one more failure
            problems = [str(exc)]
        bad += bool(problems)
        click.echo(f"{'OK  ' if not problems else 'FAIL'} {path}")
        for problem in problems:
            click.echo(f"     - {problem}")
    if bad:
        raise click.ClickException(f"{bad} of {len(paths)} cache(s) failed verification.")
