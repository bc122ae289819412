"""`defuse evaluate`: the evaluate stage."""

import click

from pipeline import layout
from stages import options


@click.command()
@options.manifest
@options.features
@options.heads
@options.reports
@options.params
def evaluate(manifest, features_dir, heads_dir, reports, params_path):
    """Score every fine-tuned model and every fusion head on the test split.

    Writes reports/metrics/test.json (DVC metrics), per-class details, confusion data for
    `dvc plots`, PNG figures, and reports/summary.md with the papers' tables.
    """
    from pipeline.config import EvaluateParams, load_params, section
    from pipeline.data import read_manifest
    from pipeline.fusion import evaluate as run
    from pipeline.fusion import fused_features
    from pipeline.report import write_reports

    final = section(EvaluateParams, "evaluate", params_path).final_head
    man = read_manifest(manifest)
    features = fused_features(man, features_dir, params_path)
    backbones = list(features.backbones)
    heads = {h: layout.head_dir(h, heads_dir) for h in load_params(params_path).get("heads") or {}}
    results = run(features, heads)
    context = {
        "dataset": "ELPV solar cells" if man.source == "elpv" else str(man.root),
        "n_test": int((features.split == "test").sum()),
        "class_names": list(features.class_names),
        "backbones": backbones,
        "fused_dim": int(features.X.shape[1]),
    }
    paths = layout.evaluate_reports(reports)
    curves = {b: layout.finetune_reports(b, reports)["curves"] for b in backbones}
    write_reports(results, final, context, paths, curves)
    click.echo(f"Report: {paths['summary']}")
    for name, r in results.items():
        m = r["metrics"]
        click.echo(
            f"  {name:<24} {r['kind']:<7} accuracy {m['accuracy']:.4f}  macro F1 {m['f1_macro']:.4f}"
        )
