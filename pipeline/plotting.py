"""Matplotlib for files, and the fine-tuning curves `defuse finetune` draws. Apart from
report.py so that editing the evaluate report does not rerun every fine-tune."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from pipeline.storage.atomic import atomic_file


def plot_history(history: list[dict], path: Path, title: str) -> None:
    """Train and val accuracy and loss per epoch: the papers' curves."""
    epochs = [int(r["epoch"]) for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    for ax, metric in zip(axes, ("acc", "loss"), strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            ax.plot(
                epochs, [r[f"{split}_{metric}"] for r in history], style, label=split, markersize=3
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` (format from its suffix) atomically and close it."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix[1:])
    plt.close(fig)
