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
    """Rank every head on every subset of the backbones by stratified k-fold CV on
    train+val; only the winner is scored on test. Answers "which models should be fused".
    Nothing is re-extracted: seconds to minutes on a CPU.
    """
    from pipeline.compare import compare as run
    from pipeline.config import CompareParams, head_params, load_params, section
    from pipeline.data import read_manifest
    from pipeline.fusion import fused_features, in_memory

    params = section(CompareParams, "compare", params_path, folds=folds)
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
        {h: head_params(h, params_path) | (params.head_overrides or {}).get(h, {}) for h in names},
        folds=params.folds,
        min_subset=params.min_subset,
        seed=params.seed,
        logit_blocks=dict(zip(backbones, features.logits, strict=True)),
        class_names=list(features.class_names),
    )
    out.mkdir(parents=True, exist_ok=True)
    board.to_csv(out / "leaderboard.csv")
    (out / "leaderboard.md").write_text(board.to_markdown())
    click.echo(board.to_markdown())
    click.echo(f"-> {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}")
