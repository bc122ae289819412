"""Paths are said once: dvc.yaml's vars and params keys agree with the library, and each
stage's dependencies are the code it runs."""

import ast
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import layout
from pipeline.config import (
    SECTIONS,
    CompareParams,
    ExtractParams,
    FuseParams,
    PrepareParams,
    evaluate_params,
    finetune_params,
    section,
)
from pipeline.deploy import RUNTIME
from pipeline.errors import ConfigError
from pipeline.fusion.heads import HEADS, make_head
from pipeline.fusion.selection import candidate_params
from pipeline.models.registry import family_of

REPO = Path(__file__).resolve().parents[1]
FAMILIES = "pipeline/models/families"
OWN_FAMILY = f"{FAMILIES}/${{item.family}}.py"  # a backbone's stages depend on its family alone
PARAMS_FILES = [REPO / "params.yaml", *sorted((REPO / "pipeline" / "presets").glob("*.yaml"))]


def test_dvc_vars_match_layout():
    dvc_vars = yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"][0]
    assert Path(dvc_vars["manifest"]) == layout.MANIFEST
    assert Path(dvc_vars["images"]) == layout.IMAGES
    assert Path(dvc_vars["models"]) == layout.MODELS
    assert Path(dvc_vars["features"]) == layout.FEATURES
    assert Path(dvc_vars["heads_dir"]) == layout.HEADS
    assert Path(dvc_vars["reports"]) == layout.REPORTS
    assert Path(dvc_vars["export"]) == layout.EXPORT


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


def test_shipped_params_files_are_valid_and_complete():
    for path in PARAMS_FILES:
        raw = yaml.safe_load(path.read_text())
        assert set(raw) == set(SECTIONS), path
        for cls, name in ((PrepareParams, "prepare"), (ExtractParams, "extract"),
                          (FuseParams, "fuse"), (CompareParams, "compare")):  # fmt: skip
            section(cls, name, path)
        for backbone, overrides in raw["backbones"].items():
            assert overrides["family"] == family_of(backbone), (path, backbone)  # dvc.yaml's deps
            finetune_params(backbone, path)
        evaluate_params(path)
        for head, params in raw["heads"].items():
            # every value stated, but those fuse supplies: fuse.block_norm, the caches'
            # widths and fuse.seed
            supplied = {"block_norm", "block_dims", "random_state"}
            assert set(params) == set(HEADS[head]._get_param_names()) - supplied, (path, head)
            fuse = raw["fuse"]  # every grid point, with what fuse supplies, is a valid head
            for candidate in candidate_params(head, params, [8], fuse["block_norm"], fuse["seed"]):
                make_head(head, **candidate)


def _file(module: str) -> Path | None:
    """The file that runs when ``module`` is imported: its .py, or a package's __init__.py
    when that imports code (a docstring-only one runs nothing a stage depends on)."""
    path = REPO / module.replace(".", "/")
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    init = path / "__init__.py"
    return init if init.is_file() and _imports(init, parents=False) else None


def _imports(path: Path, parents: bool = True) -> set[str]:
    """The `pipeline.*` and `stages.*` modules a file imports, anywhere in it, and (with
    ``parents``) the packages above them, whose __init__.py runs first."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    found = {m for m in found if m.split(".")[0] in ("pipeline", "stages")}
    if not parents:
        return found
    found |= {m.rsplit(".", k)[0] for m in found for k in range(1, m.count(".") + 1)}
    return {m for m in found if _file(m) is not None}


def _code_deps(stage_file: Path) -> set[str]:
    """Every pipeline/ file ``stage_file`` runs, following imports transitively (through
    stages/options.py too), plus the stage file itself. The registry imports the family
    modules by discovery: what they import counts, the family files themselves do not (a
    backbone's stages name its own, `OWN_FAMILY`)."""
    seen, todo = set(), [stage_file.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _imports(_file(module))
            if module == "pipeline.models.registry":
                todo += [_module(f) for f in (REPO / FAMILIES).glob("[!_]*.py")]
    files = {_file(m).relative_to(REPO).as_posix() for m in seen if m.startswith("pipeline.")}
    files = {f for f in files if not f.startswith(f"{FAMILIES}/")}
    return files | {stage_file.relative_to(REPO).as_posix()}


def _module(path: Path) -> str:
    return path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")


def test_dvc_stages_list_exactly_the_code_they_run_and_the_manifest():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        deps = (stage.get("do") or stage)["deps"]
        declared = {d for d in deps if d.endswith(".py")}
        per_backbone = name in ("decode", "finetune", "extract")
        assert (OWN_FAMILY in declared) == per_backbone, name
        expected = _code_deps(REPO / "stages" / f"{name}.py")
        if name == "export":  # it copies the runtime's files, docstring-only __init__.py too
            expected |= set(RUNTIME)
        assert declared - {OWN_FAMILY} == expected, name
        if name not in ("prepare", "export"):  # export reads the head's pins, no manifest
            assert "${manifest}" in deps, name


def test_the_export_carries_exactly_the_files_the_runtime_imports():
    """deploy.RUNTIME, which `defuse export` copies beside the graph, is pipeline.deploy's
    import closure with every package's __init__.py on the way (a regular package, so that
    no other `pipeline` on the inspection PC's path takes its place)."""
    seen, todo = set(), ["pipeline.deploy"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            path = REPO / module.replace(".", "/")
            todo += _imports(path.with_suffix(".py") if path.with_suffix(".py").is_file()
                             else path / "__init__.py")  # fmt: skip
    files = set()
    for module in seen:
        parts = module.split(".")
        files |= {"/".join(parts[:k]) + "/__init__.py" for k in range(1, len(parts))}
        path = "/".join(parts)
        files.add(f"{path}.py" if (REPO / f"{path}.py").is_file() else f"{path}/__init__.py")
    assert sorted(RUNTIME) == sorted(files)


def test_decode_writes_the_image_cache_finetune_and_extract_read():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    path = "${images}/${key}.h5"
    assert str(layout.image_cache("${key}", Path("${images}"))) == path
    assert stages["decode"]["do"]["outs"] == [path]
    for name in ("finetune", "extract"):
        stage = stages[name]["do"]
        assert path in stage["deps"] and f"--images {path}" in stage["cmd"], name
    # only the keys that set the square: a training parameter does not decode again
    assert stages["decode"]["do"]["params"] == [
        "finetune.input_size",
        "finetune.resize",
        "backbones.${key}",
    ]


def _stage_code(name: str) -> set[str]:
    """The code files dvc.yaml lists for stage ``name``: an edit to any other reruns nothing."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]
    return {d for d in (stage.get("do") or stage)["deps"] if d.endswith(".py")}


def test_fusion_and_report_edits_rerun_no_decode_finetune_or_extract():
    edited = {
        path.relative_to(REPO).as_posix()
        for folder in ("fusion", "report")
        for path in (REPO / "pipeline" / folder).rglob("*.py")
    }
    assert edited, "no fusion / report code found"
    for name in ("decode", "finetune", "extract"):
        assert not edited & _stage_code(name), name


def test_checkpoints_hash_files_without_the_feature_cache():
    closure = _code_deps(REPO / "pipeline" / "models" / "checkpoint.py")
    assert "pipeline/storage/hashing.py" in closure
    assert "pipeline/storage/feature_cache.py" not in closure


def test_feature_cache_edits_rerun_no_decode_or_finetune():
    for name in ("decode", "finetune"):
        assert "pipeline/storage/feature_cache.py" not in _stage_code(name), name


def _resolved_deps(tmp_path: Path, params: Path) -> dict[str, set[str]]:
    """Stage name -> its dependency paths, as DVC resolves dvc.yaml over ``params``."""
    from dvc.repo import Repo

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(params, tmp_path / "params.yaml")
    repo = Repo.init(tmp_path, no_scm=True)
    try:
        return {s.name: {str(d.def_path) for d in s.deps} for s in repo.index.stages}
    finally:
        repo.close()


@pytest.mark.parametrize("params", PARAMS_FILES, ids=lambda p: p.name)
def test_a_backbone_reruns_for_its_own_family_file_and_no_other(tmp_path, params):
    """A new family file is in no existing stage's deps; each backbone's decode, finetune and
    extract depend on its own family's file, and on no other family's."""
    deps = _resolved_deps(tmp_path, params)
    new = f"{FAMILIES}/a_new_family.py"
    assert not any(new in d for d in deps.values())
    for backbone in yaml.safe_load(params.read_text())["backbones"]:
        for stage in ("decode", "finetune", "extract"):
            families = {d for d in deps[f"{stage}@{backbone}"] if d.startswith(f"{FAMILIES}/")}
            assert families == {f"{FAMILIES}/{family_of(backbone)}.py"}, (stage, backbone)


def test_a_family_that_does_not_register_the_backbone_is_refused_naming_the_right_one(tmp_path):
    path = tmp_path / "params.yaml"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["backbones"] = {"inception_v4_scse": {"family": "xception"}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        finetune_params("inception_v4_scse", path)
    assert "backbones.inception_v4_scse.family is 'xception'" in str(err.value)
    assert "pipeline/models/families/inception.py; write family: inception" in str(err.value)
    raw["backbones"] = {"inception_v4_scse": {"family": "inception"}}
    path.write_text(yaml.safe_dump(raw))
    finetune_params("inception_v4_scse", path)
