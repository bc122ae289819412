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
    """Score every fine-tuned model and every fusion head on the test split; fits no head.

    The final head is `evaluate.final_head`, or with `auto` the head with the best val score
    (`fuse.select_by`). Each head is set against the best single model on test and the one
    val would have picked, with paired-bootstrap 95 % intervals and McNemar's test; its seed
    refits (saved by `defuse fuse`, `fuse.seeds`) give mean ± std. Each model's calibration
    (a temperature fitted on val: the heads' by fuse, the single models' here) is measured
    on test before and after, and the review table says what sending the least sure answers
    to a person buys (`review`). Writes reports/metrics/test.json (DVC metrics), per-class
    details, the evidence in reports/metrics/fusion_vs_single.json, the final head's choice,
    calibration and review in reports/metrics/decisions.json, confusion data for `dvc
    plots`, PNG figures, reports/summary.md with the papers' tables and a verdict, and
    reports/gallery/: the final head's most confident test errors (`evaluate.gallery` of
    them) and each backbone's Grad-CAM of them, from its checkpoint in --models (a
    backbone without one is skipped, and said so).
    """
    from pipeline.config import AUTO, FuseParams, ReviewParams, evaluate_params, head_names, section
    from pipeline.data.manifest import read_manifest
    from pipeline.fusion.fit import evaluate as run
    from pipeline.fusion.fit import final_head, fused_features
    from pipeline.report.summary import verdict, write_reports
    from pipeline.storage.outputs import check_folder_output, check_outputs

    check_folder_output(reports, "--reports")
    paths = layout.evaluate_reports(reports)
    # the layout's entries with a suffix are files, the others folders (figures/, gallery/)
    check_outputs([p for p in paths.values() if p.suffix], "--reports")
    for folder in (p for p in paths.values() if not p.suffix):
        check_folder_output(folder, "--reports")
    params = evaluate_params(params_path)
    review = section(ReviewParams, "review", params_path)
    man = read_manifest(manifest)
    review.check_classes(list(man.class_names), params_path)
    final = final_head(params_path, heads_dir)
    features = fused_features(man, features_dir, params_path)
    names = head_names(params_path)
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
        final,
        context,
        paths,
        {b: layout.finetune_reports(b, reports)["curves"] for b in features.backbones},
        draws=params.bootstrap_draws,
        seed=params.bootstrap_seed,
        gallery=_gallery(man, features, results, final, params, models),
        select_by=section(FuseParams, "fuse", params_path).select_by,
        auto=params.final_head == AUTO,
        review=review,
    )
    click.echo(f"Report: {paths['summary']}")
    for name, r in results.items():
        m = r["metrics"]
        click.echo(
            f"  {name:<24} {r['kind']:<7} accuracy {m['accuracy']:.4f}  macro F1 {m['f1_macro']:.4f}"
        )
    click.echo(f"Final head: {final}" + (" (best on val)" if params.final_head == AUTO else ""))
    if evidence and final in evidence["heads"]:
        click.echo(verdict(evidence, final))


def _gallery(man, features, results, final, params, models):
    """The final head's errors with Grad-CAM (None when `evaluate.gallery` is 0), said on
    the way."""
    from pipeline.report.explain import gallery

    if not params.gallery:
        return None
    start = time.perf_counter()
    pictures = gallery(
        man, features, results[final], final, params.gallery, models, device=params.device
    )
    for backbone, why in pictures.skipped.items():
        click.echo(f"Grad-CAM skipped for {backbone}: {why}", err=True)
    click.echo(
        f"Gallery: {len(pictures.names)} of {pictures.n_errors} test errors; Grad-CAM by "
        f"{len(pictures.cams)} of {len(features.backbones)} backbones in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return pictures
