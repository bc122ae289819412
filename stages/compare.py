"""`defuse compare`: leaderboard of heads x backbone subsets on the cached embeddings."""

from pathlib import Path

import click

from pipeline import layout
from stages import options


@click.command()
@options.manifest
@options.features
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=layout.REPORTS / "compare",
    show_default=True,
    help="Folder for leaderboard.md and leaderboard.csv.",
)
@options.params
@click.option("--folds", type=int, help="Override compare.folds.")
@click.option("--heads", "head_names", help="Comma-separated heads [every entry of `heads`].")
def compare(manifest, features_dir, out, params_path, folds, head_names):
    """Rank every head on every subset of the backbones: each fitted on train as `defuse
    fuse` fits it (its grid, `fuse.block_norm`, `fuse.select_by`), scored by nested k-fold
    CV on the val rows, which no backbone trained on; only the winner is scored on test.
    Answers "which models should be fused". Nothing is re-extracted; `compare.n_jobs`
    processes share the fits.
    """
    from pipeline.config import CompareParams, FuseParams, head_params, load_params, section
    from pipeline.data.manifest import read_manifest
    from pipeline.fusion.compare import compare as run
    from pipeline.fusion.fit import fused_features, in_memory
    from pipeline.storage.atomic import atomic_file, write_text
    from pipeline.storage.outputs import check_folder_output

    check_folder_output(out, "--out")

    params = section(CompareParams, "compare", params_path, folds=folds)
    fuse = section(FuseParams, "fuse", params_path)
    names = (
        head_names.split(",") if head_names else list(load_params(params_path).get("heads") or {})
    )
    features = fused_features(read_manifest(manifest), features_dir, params_path)
    backbones, X = list(features.backbones), in_memory(features, "defuse compare")
    blocks, start = {}, 0
    for backbone, dim in zip(backbones, features.dims, strict=True):
        blocks[backbone], start = X[:, start : start + dim], start + dim
    board = run(
        blocks,
        features.y,
        features.split,
        {h: head_params(h, params_path) for h in names},
        logit_blocks=dict(zip(backbones, features.logits, strict=True)),
        class_names=list(features.class_names),
        folds=params.folds,
        min_subset=params.min_subset,
        seed=params.seed,
        block_norm=fuse.block_norm,
        select_by=fuse.select_by,
        refit=fuse.refit,
        n_jobs=params.n_jobs,
        progress=True,
    )
    with atomic_file(out / "leaderboard.csv") as tmp:
        board.to_csv(tmp)
    write_text(out / "leaderboard.md", board.to_markdown())
    click.echo(board.to_markdown())
    click.echo(f"-> {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}")
