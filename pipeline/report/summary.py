"""Human-facing results: the papers' tables as Markdown and the figures as PNG."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.plotting import plt, save_figure
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


def plot_confusion(metrics: dict, path: Path, title: str) -> None:
    """Row-normalised confusion matrix with counts, rows = true class."""
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    names = metrics["class_names"]
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.6 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), constrained_layout=True)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(cm.shape):
        color = "white" if share[i, j] > 0.6 else "black"
        ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (acc {metrics['accuracy']:.3f})")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    save_figure(fig, path)


def plot_comparison(results: dict[str, dict], path: Path) -> None:
    """Accuracy and macro-F1 of every single model and fusion head, side by side."""
    names = list(results)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 3.8), constrained_layout=True)
    for offset, (key, label) in zip(
        (-0.2, 0.2), (("accuracy", "accuracy"), ("f1_macro", "macro F1")), strict=True
    ):
        bars = ax.bar(x + offset, [results[n][key] for n in names], 0.4, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.15)  # room for the legend above the bars
    ax.set_title("Test split: single models vs fusion")
    ax.legend(loc="upper left", ncols=2)
    save_figure(fig, path)


def plot_gains(evidence: dict, final: str, path: Path) -> None:
    """Each head's gain over the best single model with its 95 % interval, in points: a
    bar chart of two close scores hides whether the difference is more than noise."""
    heads = list(evidence["heads"])
    y = np.arange(len(heads))[::-1]  # first head on top, as in the summary's table
    fig, axes = plt.subplots(
        1, 2, figsize=(8, 1.4 + 0.45 * len(heads)), sharey=True, constrained_layout=True
    )
    for ax, (key, label) in zip(
        axes, (("accuracy", "Δ accuracy"), ("f1_macro", "Δ macro F1")), strict=True
    ):
        diff = np.array([100 * evidence["heads"][h][f"{key}_diff"] for h in heads])
        ci = np.array([[100 * v for v in evidence["heads"][h][f"{key}_ci"]] for h in heads])
        colors = ["C1" if h == final else "C0" for h in heads]
        ax.errorbar(diff, y, xerr=[diff - ci[:, 0], ci[:, 1] - diff], fmt="none", ecolor=colors)
        ax.scatter(diff, y, c=colors, zorder=3)
        for yi, d in zip(y, diff, strict=True):
            ax.text(d, yi + 0.15, f"{d:+.2f}", ha="center", fontsize=7)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(f"{label} (points, 95 % CI)")
    axes[0].set_yticks(y, [f"{h} (final)" if h == final else h for h in heads])
    axes[0].set_ylim(y.min() - 0.6, y.max() + 0.6)
    fig.suptitle(f"Fusion heads minus {evidence['best_single']}, test split, paired bootstrap")
    save_figure(fig, path)


def plot_images(
    images, captions: list[str], path: Path, title: str, heat: np.ndarray | None = None
) -> None:
    """A grid of ``images`` ((h, w, 3) uint8 each), each above its caption; ``heat`` (n, h, w)
    in [0, 1]: heat maps laid over them, with a colour bar."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width = max(2.4 * cols, 5.5) + (1.0 if heat is not None else 0.0)  # room for the title
    fig, axes = plt.subplots(
        rows, cols, figsize=(width, 2.7 * rows + 0.5), squeeze=False, constrained_layout=True
    )
    for ax in axes.flat:
        ax.set_axis_off()
    for k, (ax, image, caption) in enumerate(zip(axes.flat, images, captions, strict=False)):
        ax.imshow(image)
        if heat is not None:
            overlay = ax.imshow(heat[k], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=8)
    if heat is not None:
        fig.colorbar(overlay, ax=axes, shrink=0.6, label="Grad-CAM (1 = the image's maximum)")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def plot_gallery(gallery: Gallery, folder: Path) -> dict[str, str]:
    """``folder``/errors.png (the errors, captioned with the head's probability) and one
    gradcam_<backbone>.png per backbone explained; returns {"errors" or backbone: file name}."""
    names = gallery.class_names
    top = [f"{f}\ntrue: {names[t]}" for f, t in zip(gallery.names, gallery.true, strict=True)]
    files = {"errors": "errors.png"}
    plot_images(
        gallery.thumbnails,
        [
            f"{c}\npred: {names[p]} ({q:.2f})"
            for c, p, q in zip(top, gallery.pred, gallery.prob, strict=True)
        ],
        folder / files["errors"],
        f"`{gallery.head}` on test: {_which_errors(gallery)}, the most confident first\n"
        "(in brackets: its probability of the class it predicted)",
    )
    for backbone, cam in gallery.cams.items():
        files[backbone] = f"gradcam_{backbone}.png"
        plot_images(
            cam.images,
            [
                f"{c}\np({names[p]}) = {q:.2f}"
                for c, p, q in zip(top, gallery.pred, cam.prob, strict=True)
            ],
            folder / files[backbone],
            f"Grad-CAM of {backbone} for the class `{gallery.head}` predicted\n"
            f"(p: {backbone}'s own probability of that class)",
            cam.heat,
        )
    return files


def _which_errors(gallery: Gallery) -> str:
    shown, n = len(gallery.names), gallery.n_errors
    return f"all its {n} errors" if shown == n else f"{shown} of its {n} errors"


def _gallery_lines(gallery: Gallery, links: dict[str, str]) -> list[str]:
    lines = ["", f"## Pictures of the errors (`{gallery.head}`, test split)", ""]
    if not gallery.n_errors:
        return [*lines, f"`{gallery.head}` got all {gallery.n_test} test images right."]
    lines += [
        f"`{gallery.head}` on the {gallery.n_test} test images: {_which_errors(gallery)}, the "
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
    evidence: dict | None = None,
    seeds: dict[str, dict] | None = None,
    selections: dict[str, dict] | None = None,
) -> str:
    """`reports/summary.md`: single models vs fusion (the fusion paper's Tables 2-3), whether
    and how surely fusion beats the best single model (``evidence`` from `fusion_evidence`,
    ``seeds`` from `pipeline.fusion.fit.seed_study`), the hyper-parameters each head chose on
    val (``selections``: head -> its sidecar's "selection"), and the per-class table of the
    final head (its Table 4). ``figures`` are paths relative to it."""
    header = "| Model | Kind | " + " | ".join(label for _, label in SUMMARY_COLUMNS) + " |"
    lines = [
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
    if evidence:
        lines += _evidence_lines(evidence, final)
    if seeds:
        lines += _seed_lines(seeds, singles, evidence)
    if selections:
        lines += _selection_lines(selections)
    if final in fusions:
        per_class = fusions[final]["per_class"]
        lines += [
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
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


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
    seeds: dict[str, dict] | None = None,
    draws: int = 10_000,
    seed: int = 0,
    gallery: Gallery | None = None,
) -> dict | None:
    """Everything `defuse evaluate` leaves for people and for DVC; returns the evidence.

    ``results`` as returned by :func:`pipeline.fusion.fit.evaluate`; ``paths`` from
    :func:`pipeline.layout.evaluate_reports`; ``curves`` maps a backbone to its fine-tuning
    curves PNG (linked from the summary when it exists); ``seeds`` from
    :func:`pipeline.fusion.fit.seed_study`; ``draws`` and ``seed`` drive the paired bootstrap;
    ``gallery`` from :func:`pipeline.report.explain.gallery` is drawn into ``paths["gallery"]``
    (left empty without one) and shown in its own section.
    """
    from pipeline.metrics import write_json

    metrics = {name: r["metrics"] for name, r in results.items()}
    evidence = fusion_evidence(results, draws, seed)
    selections = {n: r["sidecar"]["selection"] for n, r in results.items() if r.get("sidecar")}
    write_json(
        paths["evidence"],
        {
            "vs_best_single": evidence,
            "seeds": seeds,
            "verdict": verdict(evidence, final)
            if evidence and final in evidence["heads"]
            else None,
        },
    )
    write_json(paths["metrics"], {name: {k: m[k] for k in HEADLINE} for name, m in metrics.items()})
    write_json(paths["details"], metrics)
    paths["confusion"].mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        with open(paths["confusion"] / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["actual", "predicted"])
            names = context["class_names"]
            writer.writerows(
                (names[a], names[p]) for a, p in zip(r["y_true"], r["y_pred"], strict=True)
            )

    figures = paths["figures"]
    plot_comparison(metrics, figures / "comparison.png")
    for name, m in metrics.items():
        plot_confusion(m, figures / f"confusion_{name}.png", name)
    summary_dir = paths["summary"].parent
    linked = [figures / "comparison.png"]
    if evidence:
        plot_gains(evidence, final, figures / "gains.png")
        linked.append(figures / "gains.png")
    if final in metrics:
        linked.append(figures / f"confusion_{final}.png")
    linked += [p for p in curves.values() if p.exists()]
    singles = {n: m for n, m in metrics.items() if results[n]["kind"] == "single"}
    fusions = {n: m for n, m in metrics.items() if results[n]["kind"] == "fusion"}
    text = summary_markdown(
        singles,
        fusions,
        final,
        context,
        [str(p.relative_to(summary_dir)) for p in linked],
        evidence,
        seeds,
        selections,
    )
    with atomic_dir(paths["gallery"]) as folder:
        files = plot_gallery(gallery, folder) if gallery is not None and gallery.names else {}
    if gallery is not None:
        links = {k: str((paths["gallery"] / f).relative_to(summary_dir)) for k, f in files.items()}
        text += "\n".join(_gallery_lines(gallery, links)) + "\n"
    paths["summary"].write_text(text)
    return evidence
