"""Paths are said once: dvc.yaml's vars and params keys agree with the library."""

from pathlib import Path

import yaml

from pipeline import layout
from pipeline.config import (
    EvaluateParams,
    ExtractParams,
    FuseParams,
    PrepareParams,
    finetune_params,
    from_dict,
    section,
)
from pipeline.heads import make_head
from pipeline.selection import grid

REPO = Path(__file__).resolve().parents[1]


def test_dvc_vars_match_layout():
    dvc_vars = yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"][0]
    assert Path(dvc_vars["manifest"]) == layout.MANIFEST
    assert Path(dvc_vars["models"]) == layout.MODELS
    assert Path(dvc_vars["features"]) == layout.FEATURES
    assert Path(dvc_vars["heads_dir"]) == layout.HEADS
    assert Path(dvc_vars["reports"]) == layout.REPORTS


def test_dvc_outputs_match_what_the_stages_write():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    finetune_files = {str(p).replace("B", "${key}") for p in layout.finetune_reports("B").values()}
    declared = set()
    for entry in ("outs", "metrics", "plots"):
        for out in stages["finetune"]["do"][entry]:
            declared.add(
                (next(iter(out)) if isinstance(out, dict) else out).replace("${reports}", "reports")
            )
    assert finetune_files <= declared
    evaluate = {str(p) for p in layout.evaluate_reports().values()}
    declared = {
        (next(iter(o)) if isinstance(o, dict) else o).replace("${reports}", "reports")
        for entry in ("outs", "metrics")
        for o in stages["evaluate"][entry]
    }
    assert evaluate == declared


def test_shipped_params_files_are_valid():
    for path in [REPO / "params.yaml", *sorted((REPO / "pipeline" / "presets").glob("*.yaml"))]:
        raw = yaml.safe_load(path.read_text())
        section(PrepareParams, "prepare", path)
        for backbone, overrides in raw["backbones"].items():
            assert overrides, f"{path}: backbones.{backbone} needs at least one key (DVC tracks it)"
            finetune_params(backbone, path)
        from_dict(ExtractParams, raw["extract"], "extract")
        from_dict(FuseParams, raw["fuse"], "fuse")
        from_dict(EvaluateParams, raw["evaluate"], "evaluate")
        for head, params in raw["heads"].items():
            for candidate in grid(params or {}):  # every grid point is a valid head
                make_head(head, **candidate)
