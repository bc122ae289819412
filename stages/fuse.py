"""`defuse fuse HEAD`: the fuse@<head> stage."""

from pathlib import Path

import click

from pipeline import layout
from stages import options


@click.command()
@click.argument("head")
@options.manifest
@options.features
@click.option("--out", type=click.Path(path_type=Path), help="Head folder [cache/heads/HEAD].")
@options.params
def fuse(head, manifest, features_dir, out, params_path):
    """Train fusion head HEAD on the concatenated feature caches.

    The backbones (and their concatenation order) are `fuse.backbones`, or every entry of
    `backbones`; the head's own parameters are `heads.HEAD` in params.yaml, where a list of
    values is a grid: each combination is fitted on train and the best on val
    (`fuse.select_by`) is kept, refitted on train + val when `fuse.refit`. Test rows are
    never read.
    """
    from pipeline.config import FuseParams, head_params, section
    from pipeline.data.manifest import read_manifest
    from pipeline.fusion.fit import fit_head, fused_features
    from pipeline.fusion.heads import HEAD_FILE, SIDECAR_FILE, save_head
    from pipeline.storage.outputs import ArtifactFolder, check_folder_output

    head_folder = ArtifactFolder.of("head", SIDECAR_FILE, HEAD_FILE)
    out = check_folder_output(out or layout.head_dir(head), "--out", head_folder)
    params = section(FuseParams, "fuse", params_path)
    features = fused_features(read_manifest(manifest), features_dir, params_path)
    fitted, sidecar = fit_head(features, head, head_params(head, params_path), params)
    save_head(fitted, out, sidecar)
    val, chosen = sidecar["val_metrics"], sidecar["selection"]["chosen"]
    n = len(sidecar["selection"]["candidates"])
    click.echo(
        f"{head} on {' + '.join(features.backbones)} ({features.X.shape[1]}-d), "
        f"{n} candidate(s), chosen on val by {params.select_by}: {chosen}\n"
        f"  val accuracy {val['accuracy']:.4f}, macro F1 {val['f1_macro']:.4f}"
        + (" (before the refit on train + val)" if params.refit else "")
    )
