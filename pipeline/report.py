"""Human-facing results: the papers' tables as Markdown and the figures as PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np

SUMMARY_COLUMNS = (
    ("accuracy", "Accuracy"),
    ("precision_macro", "Precision"),
    ("recall_macro", "Recall"),
    ("f1_macro", "F1"),
    ("f1_weighted", "F1 (weighted)"),
)


def plot_history(history: list[dict], path: Path, title: str) -> None:
    """Train and val accuracy and loss per epoch: the papers' curves."""
    epochs = [int(r["epoch"]) for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    for ax, metric in zip(axes, ("acc", "loss"), strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            ax.plot(
                epochs, [r[f"{split}_{metric}"] for r in history], style, label=split, markersize=3
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save(fig, path)


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
    _save(fig, path)


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
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
) -> str:
    """`reports/summary.md`: single models vs fusion (the fusion paper's Tables 2-3) and the
    per-class table of the final head (its Table 4). ``figures`` are paths relative to it."""
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
    best_single = max(singles, key=lambda n: singles[n]["accuracy"]) if singles else None
    if best_single and final in fusions:
        delta = 100 * (fusions[final]["accuracy"] - singles[best_single]["accuracy"])
        lines += [
            "",
            f"Final head `{final}` vs best single model `{best_single}`: {delta:+.2f} accuracy points.",
        ]
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
) -> None:
    """Everything `defuse evaluate` leaves for people and for DVC.

    ``results`` as returned by :func:`pipeline.fusion.evaluate`; ``paths`` from
    :func:`pipeline.layout.evaluate_reports`; ``curves`` maps a backbone to its fine-tuning
    curves PNG (linked from the summary when it exists).
    """
    from pipeline.metrics import write_json

    metrics = {name: r["metrics"] for name, r in results.items()}
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
    if final in metrics:
        linked.append(figures / f"confusion_{final}.png")
    linked += [p for p in curves.values() if p.exists()]
    singles = {n: m for n, m in metrics.items() if results[n]["kind"] == "single"}
    fusions = {n: m for n, m in metrics.items() if results[n]["kind"] == "fusion"}
    text = summary_markdown(
        singles, fusions, final, context, [str(p.relative_to(summary_dir)) for p in linked]
    )
    paths["summary"].write_text(text)
