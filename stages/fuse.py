"""`defuse fuse HEAD`: the fuse@<head> stage."""

from pathlib import Path

import click

from pipeline import layout
from stages import options


def _seed_list(ctx, param, value):
    """'0-4' or '0,2,5' -> [0, 1, 2, 3, 4] / [0, 2, 5]; None keeps fuse.seeds."""
    if value is None:
        return None
    try:
        seeds = []
        for part in value.split(","):
            low, _, high = part.partition("-")
            seeds += list(range(int(low), int(high or low) + 1))
    except ValueError:
        raise click.BadParameter(f"expected e.g. '0-4' or '0,2,5', got {value!r}.") from None
    if not seeds or min(seeds) < 0:
        raise click.BadParameter(f"expected seeds >= 0, e.g. '0-4'; got {value!r}.")
    return seeds


@click.command()
@click.argument("head")
@options.manifest
@options.features
@click.option("--out", type=click.Path(path_type=Path), help="Head folder [cache/heads/HEAD].")
@options.params
@click.option(
    "--seeds",
    callback=_seed_list,
    help="Seeds to refit the head with for evaluate's mean ± std, e.g. '0-4' [fuse.seeds].",
)
def fuse(head, manifest, features_dir, out, params_path, seeds):
    """Train fusion head HEAD on the concatenated feature caches.

    The backbones (and their concatenation order) are `fuse.backbones`, or every entry of
    `backbones`; the head's own parameters are `heads.HEAD` in params.yaml, where a list of
    values is a grid: each combination is fitted on train and the best on val
    (`fuse.select_by`) is kept, refitted on train + val when `fuse.refit`. A head with
    random state is fitted again so with each seed of `fuse.seeds`; the refits are saved in
    its folder for `defuse evaluate`. Test rows are never read.
    """
    from pipeline.config import FuseParams, head_params, section
    from pipeline.data.manifest import read_manifest
    from pipeline.fusion.fit import fit_head, fit_seed_refits, fused_features
    from pipeline.fusion.heads import HEAD_FOLDER, save_head
    from pipeline.storage.outputs import check_folder_output

    out = check_folder_output(out or layout.head_dir(head), "--out", HEAD_FOLDER)
    params = section(FuseParams, "fuse", params_path, seeds=seeds)
    entry = head_params(head, params_path)
    features = fused_features(read_manifest(manifest), features_dir, params_path)
    fitted, sidecar = fit_head(features, head, entry, params)
    refits = fit_seed_refits(features, head, entry, params)
    save_head(fitted, out, sidecar, seed_refits=refits)
    val, chosen = sidecar["val_metrics"], sidecar["selection"]["chosen"]
    n = len(sidecar["selection"]["candidates"])
    click.echo(
        f"{head} on {' + '.join(features.backbones)} ({features.X.shape[1]}-d), "
        f"{n} candidate(s), chosen on val by {params.select_by}: {chosen}\n"
        f"  val accuracy {val['accuracy']:.4f}, macro F1 {val['f1_macro']:.4f}"
        + (" (before the refit on train + val)" if params.refit else "")
        + f"\n  temperature {fitted.temperature_:.3f} (fitted on val by log loss)"
        + f"\n  seeds {list(refits.seeds)}: {len(refits.heads)} refit(s) saved beside it"
    )
