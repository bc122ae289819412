"""`defuse evaluate`: the evaluate stage."""

import time

import click

from pipeline import layout
from stages import options


@click.command()
@options.manifest
@options.features
@options.heads
@options.models
@options.reports
@options.params
def evaluate(manifest, features_dir, heads_dir, models, reports, params_path):
    """Score every fine-tuned model and every fusion head on the test split; fits nothing.

    Each head is set against the best single model with paired-bootstrap 95 % intervals and
    McNemar's test; its seed refits (saved by `defuse fuse`, `fuse.seeds`) give mean ± std.
    Writes reports/metrics/test.json (DVC metrics), per-class details, the evidence in
    reports/metrics/fusion_vs_single.json, confusion data for `dvc plots`, PNG figures,
    reports/summary.md with the papers' tables and a one-sentence verdict, and
    reports/gallery/: the final head's most confident test errors (`evaluate.gallery` of
    them) and each backbone's Grad-CAM of them, from its checkpoint in --models (a
    backbone without one is skipped, and said so).
    """
    from pipeline.config import evaluate_params, load_params
    from pipeline.data.manifest import read_manifest
    from pipeline.fusion.fit import evaluate as run
    from pipeline.fusion.fit import fused_features
    from pipeline.report.summary import verdict, write_reports
    from pipeline.storage.outputs import check_folder_output, check_outputs

    check_folder_output(reports, "--reports")
    paths = layout.evaluate_reports(reports)
    # the layout's entries with a suffix are files, the others folders (figures/, gallery/)
    check_outputs([p for p in paths.values() if p.suffix], "--reports")
    for folder in (p for p in paths.values() if not p.suffix):
        check_folder_output(folder, "--reports")
    params = evaluate_params(params_path)
    man = read_manifest(manifest)
    features = fused_features(man, features_dir, params_path)
    names = list(load_params(params_path).get("heads") or {})
    results = run(features, {h: layout.head_dir(h, heads_dir) for h in names})
    context = {
        "dataset": "ELPV solar cells" if man.source == "elpv" else str(man.root),
        "n_test": int((features.split == "test").sum()),
        "class_names": list(features.class_names),
        "backbones": list(features.backbones),
        "fused_dim": int(features.X.shape[1]),
    }
    evidence = write_reports(
        results,
        params.final_head,
        context,
        paths,
        {b: layout.finetune_reports(b, reports)["curves"] for b in features.backbones},
        draws=params.bootstrap_draws,
        seed=params.bootstrap_seed,
        gallery=_gallery(man, features, results, params, models),
    )
    click.echo(f"Report: {paths['summary']}")
    for name, r in results.items():
        m = r["metrics"]
        click.echo(
            f"  {name:<24} {r['kind']:<7} accuracy {m['accuracy']:.4f}  macro F1 {m['f1_macro']:.4f}"
        )
    if evidence and params.final_head in evidence["heads"]:
        click.echo(verdict(evidence, params.final_head))


def _gallery(man, features, results, params, models):
    """The final head's errors with Grad-CAM (None when `evaluate.gallery` is 0), said on
    the way."""
    from pipeline.report.explain import gallery

    if not params.gallery:
        return None
    start = time.perf_counter()
    final = results[params.final_head]
    pictures = gallery(
        man, features, final, params.final_head, params.gallery, models, device=params.device
    )
    for backbone, why in pictures.skipped.items():
        click.echo(f"Grad-CAM skipped for {backbone}: {why}", err=True)
    click.echo(
        f"Gallery: {len(pictures.names)} of {pictures.n_errors} test errors; Grad-CAM by "
        f"{len(pictures.cams)} of {len(features.backbones)} backbones in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return pictures
