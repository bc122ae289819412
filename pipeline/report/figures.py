"""The evaluate figures as PNG: confusion matrices, the comparison of every model, the
heads' gains over the best single model, the final head's reliability diagram, the
risk-coverage curves, and the gallery of errors with Grad-CAM."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.calibration import reliability
from pipeline.plotting import plt, save_figure
from pipeline.report.decisions import risk_coverage

if TYPE_CHECKING:
    from pipeline.report.explain import Gallery


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


def plot_reliability(result: dict, name: str, path: Path) -> None:
    """Accuracy against confidence per confidence bin, before and after the temperature,
    on the diagonal where the model is as sure as it is right; dot size ~ images in the bin."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4), constrained_layout=True)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="calibrated")
    for key, label, color in (("proba_raw", "before", "C0"), ("proba", "after", "C1")):
        bins = reliability(result[key], result["y_true"])
        conf, acc = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
        sizes = [8 + 200 * b["n"] / len(result["y_true"]) for b in bins]
        ax.plot(conf, acc, "-", color=color, lw=1, label=label)
        ax.scatter(conf, acc, s=sizes, color=color, zorder=3)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"`{name}` on test, temperature {result['temperature']:.2f}")
    ax.legend(loc="upper left")
    save_figure(fig, path)


def plot_risk_coverage(results: dict[str, dict], path: Path) -> None:
    """Accuracy on the images kept against the share sent to review, the least sure first,
    for each of ``results`` (name -> `evaluate` result)."""
    fig, ax = plt.subplots(figsize=(5.6, 4), constrained_layout=True)
    for name, result in results.items():
        reviewed, accuracy = risk_coverage(result)
        ax.plot(100 * reviewed, 100 * accuracy, label=name)
    ax.set_xlim(0, 50)  # beyond half the parts, review is the inspection
    ax.set_xlabel("test images sent to review, least sure first (%)")
    ax.set_ylabel("accuracy on the images kept (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Risk-coverage, test split")
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
        f"`{gallery.head}` on test: {which_errors(gallery)}, the most confident first\n"
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


def which_errors(gallery: Gallery) -> str:
    """'all its n errors' or 'k of its n errors': what a gallery shows."""
    shown, n = len(gallery.names), gallery.n_errors
    return f"all its {n} errors" if shown == n else f"{shown} of its {n} errors"
