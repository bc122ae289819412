"""Human-facing results: the papers' tables as Markdown, the evidence that fusion helps,
and everything `defuse evaluate` writes (figures drawn by `pipeline.report.figures`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.fusion.selection import best_on_val
from pipeline.report.decisions import calibration, review_table
from pipeline.report.figures import (
    plot_comparison,
    plot_confusion,
    plot_gains,
    plot_gallery,
    plot_reliability,
    plot_risk_coverage,
    which_errors,
)
from pipeline.storage.atomic import atomic_dir

if TYPE_CHECKING:
    from pipeline.config import ReviewParams
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
    decisions: dict,
) -> str:
    """`reports/summary.md`: single models vs fusion (the fusion paper's Tables 2-3), how
    the final head was chosen, whether and how surely fusion beats the best single model
    (``evidence`` from `fusion_evidence`, None without both kinds; ``seeds``: head -> its
    seed refits' test scores), the hyper-parameters each head chose on val (``selections``:
    head -> its sidecar's "selection"), calibration and review (``decisions`` from
    `_decisions`), and the per-class table of the final head (its Table 4).
    ``figures`` are paths relative to it."""
    lines = _results_lines(singles, fusions, context)
    if decisions["final_head"]["val"]:
        lines += _final_lines(decisions["final_head"])
    if evidence:
        lines += _evidence_lines(evidence, final)
    if seeds:
        lines += _seed_lines(seeds, singles, evidence)
    if selections:
        lines += _selection_lines(selections)
    lines += _calibration_lines(decisions["calibration"], final)
    lines += _review_lines(decisions["review"])
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


def fusion_evidence(results: dict[str, dict], draws: int, seed: int, select_by: str) -> dict | None:
    """Each fusion head against the best single model on test (highest accuracy: the
    strictest baseline) and against the single model a user would have picked on val (by
    ``select_by``), as `pipeline.report.stats.paired_comparison` dicts; None without both kinds."""
    from pipeline.report.stats import paired_comparison

    singles = [n for n, r in results.items() if r["kind"] == "single"]
    fusions = [n for n, r in results.items() if r["kind"] == "fusion"]
    if not singles or not fusions:
        return None
    best = _best_single(results)
    picked = best_on_val({n: results[n]["val"] for n in singles}, select_by)
    y = results[best]["y_true"]
    n_classes = len(results[best]["metrics"]["class_names"])

    def against(single: str) -> dict:
        base = results[single]["y_pred"]
        return {
            n: paired_comparison(y, results[n]["y_pred"], base, n_classes, draws, seed).to_dict()
            for n in fusions
        }

    return {
        "best_single": best,
        "baseline_rule": "the single model with the highest test accuracy",
        "heads": against(best),
        "val_single": picked,
        "val_single_rule": f"the single model with the best val {select_by}",
        "heads_vs_val_single": against(picked),
    }


def verdict(evidence: dict, final: str) -> str:
    """Two sentences: did the final head beat the best single model, and how sure is that;
    and its gain over the single model val would have picked."""
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
    picked = evidence["val_single"]
    if picked == best:
        also = f"`{best}` is also the single model val would have picked."
    else:
        v = evidence["heads_vs_val_single"][final]
        lo, hi = v["accuracy_ci"]
        also = (
            f"Against `{picked}`, the single model val would have picked, it gains "
            f"{_pts(v['accuracy_diff'])} accuracy points [{_pts(lo)}, {_pts(hi)}]."
        )
    return f"{head}; {how} (McNemar p = {e['mcnemar_p']:.3g}). {also}"


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
        *_comparison_table(evidence["heads"]),
    ]
    picked = evidence["val_single"]
    if picked != evidence["best_single"]:
        lines += [
            "",
            f"Against `{picked}`, {evidence['val_single_rule']} (what a user would have "
            "picked without fusion), the same way:",
            "",
            *_comparison_table(evidence["heads_vs_val_single"]),
        ]
    if final in evidence["heads"]:
        lines += ["", f"**{verdict(evidence, final)}**"]
    return lines


def _comparison_table(comparisons: dict[str, dict]) -> list[str]:
    lines = [
        "| Head | Δ accuracy [95 % CI] | Δ macro F1 [95 % CI] | McNemar p | only head right | only single right |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in comparisons.items():
        lo, hi = e["accuracy_ci"]
        flo, fhi = e["f1_macro_ci"]
        lines.append(
            f"| {name} | {_pts(e['accuracy_diff'])} [{_pts(lo)}, {_pts(hi)}] "
            f"| {_pts(e['f1_macro_diff'])} [{_pts(flo)}, {_pts(fhi)}] | {e['mcnemar_p']:.3g} "
            f"| {e['only_a_right']} | {e['only_b_right']} |"
        )
    return lines


def _final_lines(choice: dict) -> list[str]:
    final, by = choice["name"], choice["select_by"]
    how = (
        f"chosen on val by {by} (`evaluate.final_head: auto`, log loss breaking ties)"
        if choice["auto"]
        else "named in params.yaml (`evaluate.final_head`)"
    )
    return [
        "",
        f"## The final head: `{final}`",
        "",
        f"`{final}` is the head `defuse predict` and `defuse export` use, {how}. Each head's "
        "val scores are its chosen candidate's, before the refit on train + val; test plays "
        "no part.",
        "",
        "| Head | val accuracy | val macro F1 | val log loss |",
        "|---|---|---|---|",
        *(
            f"| {f'**{n}**' if n == final else n} | {100 * v['accuracy']:.2f} "
            f"| {100 * v['f1_macro']:.2f} | {-v['log_loss']:.4f} |"
            for n, v in choice["val"].items()
        ),
    ]


def _calibration_lines(table: dict[str, dict], final: str) -> list[str]:
    return [
        "",
        "## Calibration (test split)",
        "",
        "Each model's probabilities pass through one temperature fitted on val by log loss "
        "(a head's when fuse fitted it; a single model's by evaluate): the predicted class "
        "stays, how sure it claims to be changes. ECE: the gap between confidence and "
        "accuracy over 15 confidence bins (0 is perfectly calibrated).",
        "",
        "| Model | temperature | log loss before → after | ECE before → after |",
        "|---|---|---|---|",
        *(
            f"| {f'**{n}**' if n == final else n} | {c['temperature']:.3f} "
            f"| {c['log_loss'][0]:.4f} → {c['log_loss'][1]:.4f} "
            f"| {c['ece'][0]:.4f} → {c['ece'][1]:.4f} |"
            for n, c in table.items()
        ),
    ]


def _review_lines(review: dict) -> list[str]:
    defect_free = review["defect_free"]
    lines = [
        "",
        "## Sending the least sure answers to a person (test split)",
        "",
        "At each review rate the least sure images (calibrated top probability) go to a "
        "person; `defuse predict --review-below P` flags those below P. Accuracy is on the "
        "images kept"
        + (
            f"; a defective part passes as good when it is kept and predicted "
            f"{' or '.join(f'`{c}`' for c in defect_free)} (share of all defective test parts)."
            if defect_free
            else "."
        ),
    ]
    for name, rows in review["models"].items():
        head = "| review rate | review below P | accuracy kept |"
        rule = "|---|---|---|"
        if defect_free:
            head, rule = head + " defective passed as good |", rule + "---|"
        lines += ["", f"`{name}`:", "", head, rule]
        for r in rows:
            line = (
                f"| {100 * r['rate']:.0f} % ({r['reviewed']}) | {r['review_below']:.3f} "
                f"| {100 * r['accuracy_kept']:.2f} |"
            )
            if defect_free:
                line += f" {100 * r['defective_passed_rate']:.2f} % ({r['defective_passed']}) |"
            lines.append(line)
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
    select_by: str,
    auto: bool,
    review: ReviewParams,
) -> dict | None:
    """Everything `defuse evaluate` leaves for people and for DVC; returns the evidence.

    ``results`` as returned by :func:`pipeline.fusion.fit.evaluate` (a head's "seeds": its
    seed refits' test scores); ``final`` the final head, chosen on val by ``select_by``
    when ``auto``; ``paths`` from :func:`pipeline.layout.evaluate_reports`; ``curves`` maps
    a backbone to its fine-tuning curves PNG (linked from the summary when it exists);
    ``draws`` and ``seed`` drive the paired bootstrap (`evaluate.bootstrap_*`); ``review``
    says which classes are defect-free and which review rates to tabulate; ``gallery`` from
    :func:`pipeline.report.explain.gallery` is drawn into ``paths["gallery"]`` (left empty
    without one) and shown in its own section.
    """
    metrics = {name: r["metrics"] for name, r in results.items()}
    evidence = fusion_evidence(results, draws, seed, select_by)
    seeds = {n: r["seeds"] for n, r in results.items() if r.get("seeds")}
    decisions = _decisions(results, final, select_by, auto, review)
    _write_metrics(results, final, evidence, seeds, decisions, paths, context["class_names"])
    linked = _write_figures(results, final, evidence, paths["figures"], curves)
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
        decisions=decisions,
    )
    paths["summary"].write_text(text + _write_gallery(gallery, paths["gallery"], summary_dir))
    return evidence


def _best_single(results: dict[str, dict]) -> str | None:
    """The single model with the highest test accuracy: the conservative reference."""
    singles = [n for n, r in results.items() if r["kind"] == "single"]
    return max(singles, key=lambda n: results[n]["metrics"]["accuracy"]) if singles else None


def _decisions(results, final, select_by, auto, review) -> dict:
    """reports/metrics/decisions.json: how the final head was chosen (each head's val
    scores), each model's calibration on test, and the review table of the final head and
    of the best single model."""
    names = results[final]["metrics"]["class_names"]
    defect_free = list(review.defect_free or ())
    defective = np.array([c not in defect_free for c in names]) if defect_free else None
    shown = dict.fromkeys(n for n in (final, _best_single(results)) if n)
    return {
        "final_head": {
            "name": final,
            "auto": auto,
            "select_by": select_by,
            "val": {n: r["val"] for n, r in results.items() if r["kind"] == "fusion"},
        },
        "calibration": {n: calibration(r) for n, r in results.items()},
        "review": {
            "defect_free": defect_free or None,
            "models": {n: review_table(results[n], review.rates, defective) for n in shown},
        },
    }


def _write_metrics(results, final, evidence, seeds, decisions, paths, class_names) -> None:
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
    write_json(paths["decisions"], decisions)
    paths["confusion"].mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        with open(paths["confusion"] / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["actual", "predicted"])
            writer.writerows(
                (class_names[a], class_names[p])
                for a, p in zip(r["y_true"], r["y_pred"], strict=True)
            )


def _write_figures(results, final, evidence, figures: Path, curves) -> list[Path]:
    """The comparison, gains, confusion, reliability and risk-coverage PNGs; returns those
    the summary links."""
    metrics = {name: r["metrics"] for name, r in results.items()}
    plot_comparison(metrics, figures / "comparison.png")
    for name, m in metrics.items():
        plot_confusion(m, figures / f"confusion_{name}.png", name)
    linked = [figures / "comparison.png"]
    if evidence:
        plot_gains(evidence, final, figures / "gains.png")
        linked.append(figures / "gains.png")
    linked.append(figures / f"confusion_{final}.png")
    plot_reliability(results[final], final, figures / "reliability.png")
    best = _best_single(results)
    curves_of = {f"{final} (final head)": results[final]}
    if best:
        curves_of[f"{best} (best single model on test)"] = results[best]
    plot_risk_coverage(curves_of, figures / "risk_coverage.png")
    linked += [figures / "reliability.png", figures / "risk_coverage.png"]
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
