"""Human-facing results: the papers' tables as Markdown, the evidence that fusion helps,
and everything `defuse evaluate` writes (figures drawn by `pipeline.report.figures`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.report.figures import (
    plot_comparison,
    plot_confusion,
    plot_gains,
    plot_gallery,
    which_errors,
)
from pipeline.storage.atomic import atomic_dir

if TYPE_CHECKING:
    from pipeline.report.explain import Gallery

SUMMARY_COLUMNS = (
    ("accuracy", "Accuracy"),
    ("precision_macro", "Precision"),
    ("recall_macro", "Recall"),
    ("f1_macro", "F1"),
    ("f1_weighted", "F1 (weighted)"),
)


def _gallery_lines(gallery: Gallery, links: dict[str, str]) -> list[str]:
    lines = ["", f"## Pictures of the errors (`{gallery.head}`, test split)", ""]
    if not gallery.n_errors:
        return [*lines, f"`{gallery.head}` got all {gallery.n_test} test images right."]
    lines += [
        f"`{gallery.head}` on the {gallery.n_test} test images: {which_errors(gallery)}, the "
        "most confident first (`evaluate.gallery` caps them), with the true class, the "
        "predicted class and the head's probability of it.",
        "",
        f"![errors]({links['errors']})",
    ]
    if gallery.cams:
        lines += [
            "",
            "Grad-CAM of the same images by each fine-tuned backbone, for the class the head "
            "predicted: red where the gradient of the backbone's own classifier logit for that "
            "class, on its last feature map, found the most evidence; p is the backbone's own "
            "probability of the class.",
        ]
    for backbone in gallery.cams:
        lines += ["", f"### Grad-CAM: {backbone}", "", f"![gradcam_{backbone}]({links[backbone]})"]
    for backbone, why in gallery.skipped.items():
        lines += ["", f"**Grad-CAM skipped for `{backbone}`**: {why}"]
    return lines


def _row(name: str, kind: str, m: dict) -> str:
    return (
        f"| {name} | {kind} | " + " | ".join(f"{100 * m[k]:.2f}" for k, _ in SUMMARY_COLUMNS) + " |"
    )


def summary_markdown(
    singles: dict[str, dict],
    fusions: dict[str, dict],
    final: str,
    context: dict,
    figures: list[str],
    *,
    evidence: dict | None,
    seeds: dict[str, dict],
    selections: dict[str, dict],
) -> str:
    """`reports/summary.md`: single models vs fusion (the fusion paper's Tables 2-3), whether
    and how surely fusion beats the best single model (``evidence`` from `fusion_evidence`,
    None without both kinds; ``seeds``: head -> its seed refits' test scores), the
    hyper-parameters each head chose on val (``selections``: head -> its sidecar's
    "selection"), and the per-class table of the final head (its Table 4). ``figures`` are
    paths relative to it."""
    lines = _results_lines(singles, fusions, context)
    if evidence:
        lines += _evidence_lines(evidence, final)
    if seeds:
        lines += _seed_lines(seeds, singles, evidence)
    if selections:
        lines += _selection_lines(selections)
    if final in fusions:
        lines += _per_class_lines(fusions[final]["per_class"], final)
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _results_lines(singles: dict, fusions: dict, context: dict) -> list[str]:
    header = "| Model | Kind | " + " | ".join(label for _, label in SUMMARY_COLUMNS) + " |"
    return [
        "# defuse results",
        "",
        f"Dataset: {context['dataset']}; test split: {context['n_test']} images, "
        f"{len(context['class_names'])} classes ({', '.join(context['class_names'])}).",
        f"Fusion input: {' + '.join(context['backbones'])} ({context['fused_dim']}-d).",
        "",
        "## Single models vs fusion (test split, %; precision / recall / F1 macro-averaged)",
        "",
        header,
        "|" + "---|" * (len(SUMMARY_COLUMNS) + 2),
        *(_row(n, "single (fine-tuned)", m) for n, m in singles.items()),
        *(_row(n, "fusion head", m) for n, m in fusions.items()),
    ]


def _per_class_lines(per_class: dict, final: str) -> list[str]:
    return [
        "",
        f"## Per-class results of the `{final}` fusion head (test split, %)",
        "",
        "| Class | Precision | Recall | F1 | Support |",
        "|---|---|---|---|---|",
        *(
            f"| {c} | {100 * v['precision']:.2f} | {100 * v['recall']:.2f} | {100 * v['f1']:.2f} | {v['support']} |"
            for c, v in per_class.items()
        ),
    ]


def fusion_evidence(results: dict[str, dict], draws: int, seed: int) -> dict | None:
    """Each fusion head against the best single model on test (highest accuracy: the
    strictest baseline), as `pipeline.report.stats.paired_comparison` dicts; None without both."""
    from pipeline.report.stats import paired_comparison

    singles = [n for n, r in results.items() if r["kind"] == "single"]
    fusions = [n for n, r in results.items() if r["kind"] == "fusion"]
    if not singles or not fusions:
        return None
    best = max(singles, key=lambda n: results[n]["metrics"]["accuracy"])
    y, base = results[best]["y_true"], results[best]["y_pred"]
    n_classes = len(results[best]["metrics"]["class_names"])
    return {
        "best_single": best,
        "baseline_rule": "the single model with the highest test accuracy",
        "heads": {
            n: paired_comparison(y, results[n]["y_pred"], base, n_classes, draws, seed).to_dict()
            for n in fusions
        },
    }


def verdict(evidence: dict, final: str) -> str:
    """One sentence: did the final head beat the best single model, and how sure is that."""
    e, best = evidence["heads"][final], evidence["best_single"]
    acc, f1 = 100 * e["accuracy_diff"], 100 * e["f1_macro_diff"]
    sure = [
        k for k, ci in (("accuracy", e["accuracy_ci"]), ("macro F1", e["f1_macro_ci"])) if ci[0] > 0
    ]
    if acc > 0 and f1 > 0:
        head = f"The final head `{final}` beat the best single model `{best}` on both test accuracy ({acc:+.2f} points) and macro F1 ({f1:+.2f})"
    elif acc > 0 or f1 > 0:
        won, lost = ("accuracy", "macro F1") if acc > 0 else ("macro F1", "accuracy")
        head = f"The final head `{final}` beat the best single model `{best}` on test {won} but not on {lost} ({acc:+.2f} accuracy points, {f1:+.2f} macro F1)"
    else:
        head = f"The final head `{final}` did not beat the best single model `{best}` ({acc:+.2f} accuracy points, {f1:+.2f} macro F1)"
    if sure:
        how = f"the paired-bootstrap 95 % interval excludes zero for {' and '.join(sure)}"
    else:
        how = "both paired-bootstrap 95 % intervals include zero, so this test split cannot tell them apart"
    return f"{head}; {how} (McNemar p = {e['mcnemar_p']:.3g})."


def _pts(x: float) -> str:
    return f"{100 * x:+.2f}"


def _evidence_lines(evidence: dict, final: str) -> list[str]:
    e0 = next(iter(evidence["heads"].values()))
    lines = [
        "",
        f"## Fusion vs the best single model (`{evidence['best_single']}`, test split)",
        "",
        f"Differences in points (head - `{evidence['best_single']}`), paired-bootstrap 95 % "
        f"intervals over {e0['draws']:,} resamplings of the {e0['n']} test images; McNemar's "
        "exact test on the images exactly one of the two gets right.",
        "",
        "| Head | Δ accuracy [95 % CI] | Δ macro F1 [95 % CI] | McNemar p | only head right | only single right |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in evidence["heads"].items():
        lo, hi = e["accuracy_ci"]
        flo, fhi = e["f1_macro_ci"]
        lines.append(
            f"| {name} | {_pts(e['accuracy_diff'])} [{_pts(lo)}, {_pts(hi)}] "
            f"| {_pts(e['f1_macro_diff'])} [{_pts(flo)}, {_pts(fhi)}] | {e['mcnemar_p']:.3g} "
            f"| {e['only_a_right']} | {e['only_b_right']} |"
        )
    if final in evidence["heads"]:
        lines += ["", f"**{verdict(evidence, final)}**"]
    return lines


def _seed_lines(seeds: dict, singles: dict, evidence: dict | None) -> list[str]:
    n = max(len(r["seeds"]) for r in seeds.values())
    lines = [
        "",
        f"## Over head seeds (test split, %, mean ± std over {n} refits, selection included)",
        "",
        "A head without random state is fitted once (std 0).",
        "",
        "| Head | seeds | Accuracy | Macro F1 | Δ accuracy vs best single | Δ macro F1 vs best single |",
        "|---|---|---|---|---|---|",
    ]
    best = singles[evidence["best_single"]] if evidence else None
    for name, r in seeds.items():
        acc, f1 = np.asarray(r["accuracy"]), np.asarray(r["f1_macro"])
        delta = (
            f"{_pts(acc.mean() - best['accuracy'])} | {_pts(f1.mean() - best['f1_macro'])}"
            if best
            else "- | -"
        )
        lines.append(
            f"| {name} | {','.join(map(str, r['seeds']))} | {100 * acc.mean():.2f} ± {100 * acc.std():.2f} "
            f"| {100 * f1.mean():.2f} ± {100 * f1.std():.2f} | {delta} |"
        )
    return lines


def _selection_lines(selections: dict[str, dict]) -> list[str]:
    lines = [
        "",
        "## Hyper-parameters chosen on val (never on test)",
        "",
        "| Head | chosen | picked by | refit on train + val | candidates: val accuracy / macro F1 / log loss |",
        "|---|---|---|---|---|",
    ]
    for name, sel in selections.items():
        chosen = ", ".join(f"{k}={v}" for k, v in sel["chosen"].items()) or "(no params)"
        tried = "; ".join(
            (", ".join(f"{k}={v}" for k, v in c.items() if k != "val") or "-")
            + f": {c['val']['accuracy']:.3f} / {c['val']['f1_macro']:.3f} / {-c['val']['log_loss']:.3f}"
            for c in sel["candidates"]
        )
        lines.append(
            f"| {name} | {chosen} | val {sel['select_by']} | {'yes' if sel['refit_on_train_val'] else 'no'} | {tried} |"
        )
    return lines


HEADLINE = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
)


def write_reports(
    results: dict[str, dict],
    final: str,
    context: dict,
    paths: dict[str, Path],
    curves: dict[str, Path],
    *,
    draws: int,
    seed: int,
    gallery: Gallery | None,
) -> dict | None:
    """Everything `defuse evaluate` leaves for people and for DVC; returns the evidence.

    ``results`` as returned by :func:`pipeline.fusion.fit.evaluate` (a head's "seeds": its
    seed refits' test scores); ``paths`` from :func:`pipeline.layout.evaluate_reports`;
    ``curves`` maps a backbone to its fine-tuning curves PNG (linked from the summary when
    it exists); ``draws`` and ``seed`` drive the paired bootstrap (`evaluate.bootstrap_*`);
    ``gallery`` from :func:`pipeline.report.explain.gallery` is drawn into
    ``paths["gallery"]`` (left empty without one) and shown in its own section.
    """
    metrics = {name: r["metrics"] for name, r in results.items()}
    evidence = fusion_evidence(results, draws, seed)
    seeds = {n: r["seeds"] for n, r in results.items() if r.get("seeds")}
    _write_metrics(results, final, evidence, seeds, paths, context["class_names"])
    linked = _write_figures(metrics, final, evidence, paths["figures"], curves)
    summary_dir = paths["summary"].parent
    text = summary_markdown(
        {n: m for n, m in metrics.items() if results[n]["kind"] == "single"},
        {n: m for n, m in metrics.items() if results[n]["kind"] == "fusion"},
        final,
        context,
        [str(p.relative_to(summary_dir)) for p in linked],
        evidence=evidence,
        seeds=seeds,
        selections={n: r["sidecar"]["selection"] for n, r in results.items() if r.get("sidecar")},
    )
    paths["summary"].write_text(text + _write_gallery(gallery, paths["gallery"], summary_dir))
    return evidence


def _write_metrics(results, final, evidence, seeds, paths, class_names) -> None:
    """The JSON metrics and evidence, and one confusion CSV per model, for DVC."""
    from pipeline.metrics import write_json

    metrics = {name: r["metrics"] for name, r in results.items()}
    won = evidence and final in evidence["heads"]
    write_json(
        paths["evidence"],
        {
            "vs_best_single": evidence,
            "seeds": seeds,
            "verdict": verdict(evidence, final) if won else None,
        },
    )
    write_json(paths["metrics"], {name: {k: m[k] for k in HEADLINE} for name, m in metrics.items()})
    write_json(paths["details"], metrics)
    paths["confusion"].mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        with open(paths["confusion"] / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["actual", "predicted"])
            writer.writerows(
                (class_names[a], class_names[p])
                for a, p in zip(r["y_true"], r["y_pred"], strict=True)
            )


def _write_figures(metrics, final, evidence, figures: Path, curves) -> list[Path]:
    """The comparison, gains and confusion PNGs; returns those the summary links."""
    plot_comparison(metrics, figures / "comparison.png")
    for name, m in metrics.items():
        plot_confusion(m, figures / f"confusion_{name}.png", name)
    linked = [figures / "comparison.png"]
    if evidence:
        plot_gains(evidence, final, figures / "gains.png")
        linked.append(figures / "gains.png")
    if final in metrics:
        linked.append(figures / f"confusion_{final}.png")
    return linked + [p for p in curves.values() if p.exists()]


def _write_gallery(gallery: Gallery | None, folder: Path, summary_dir: Path) -> str:
    """``folder`` refilled with the gallery's pictures (emptied without one); returns the
    summary's section on them ("" without a gallery)."""
    with atomic_dir(folder) as tmp:
        files = plot_gallery(gallery, tmp) if gallery is not None and gallery.names else {}
    if gallery is None:
        return ""
    links = {k: str((folder / f).relative_to(summary_dir)) for k, f in files.items()}
    return "\n".join(_gallery_lines(gallery, links)) + "\n"
