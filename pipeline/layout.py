"""Where each artifact lives, said once; dvc.yaml's `vars` repeat it and a test checks they agree."""

from pathlib import Path

CACHE = Path("cache")
MANIFEST = CACHE / "manifest.csv"  # + manifest.json (source, root, classes) + skipped.csv
IMAGES = CACHE / "images"  # <backbone>.h5: every image decoded once, squared for the backbone
MODELS = CACHE / "models"  # <backbone>/model.safetensors + model.json
FEATURES = CACHE / "features"  # <backbone>.h5
HEADS = CACHE / "heads"  # <head>/head.safetensors + head.json
EXPORT = CACHE / "export"  # model.onnx + model.json: the fused model, runnable without torch
REPORTS = Path("reports")


def image_cache(backbone: str, root: Path = IMAGES) -> Path:
    return root / f"{backbone}.h5"


def checkpoint_dir(backbone: str, root: Path = MODELS) -> Path:
    return root / backbone


FOLDS = "folds"  # the checkpoint's subfolder of cross-fitting's fold models


def fold_dir(checkpoint: Path, k: int) -> Path:
    """Cross-fitting's fold model k of a checkpoint: it never saw that fold's train rows."""
    return checkpoint / FOLDS / str(k)


def feature_cache(backbone: str, root: Path = FEATURES) -> Path:
    return root / f"{backbone}.h5"


def head_dir(head: str, root: Path = HEADS) -> Path:
    return root / head


def finetune_reports(backbone: str, root: Path = REPORTS) -> dict[str, Path]:
    """Per-backbone fine-tuning outputs: DVC metrics, per-epoch plot data and its PNG."""
    return {
        "metrics": root / "metrics" / f"finetune_{backbone}.json",
        "history": root / "plots" / f"history_{backbone}.csv",
        "curves": root / "plots" / f"curves_{backbone}.png",
    }


def evaluate_reports(root: Path = REPORTS) -> dict[str, Path]:
    """`defuse evaluate` outputs: headline metrics, full details, confusion data, figures, the
    pictures of the errors."""
    return {
        "summary": root / "summary.md",
        "metrics": root / "metrics" / "test.json",
        "details": root / "metrics" / "test_details.json",
        "evidence": root / "metrics" / "fusion_vs_single.json",  # intervals, p-values, seeds
        "decisions": root / "metrics" / "decisions.json",  # final head, calibration, review
        "confusion": root / "plots" / "confusion",  # <model>.csv: actual,predicted per test image
        "figures": root / "figures",
        "gallery": root / "gallery",  # errors.png and gradcam_<backbone>.png
    }
