"""A fitted head on disk, and the one place that validates it: head.json (the sidecar, the
head's params, classes and learned JSON state) + head.safetensors (its arrays), and
seeds.json + seeds/<seed>/ (the head refitted with other seeds). Never a pickle.

Every reader (evaluate, predict, export) loads through `load_head` / `load_seed_heads`
and checks the head against what it is used with by `check_head_fits`; `save_head` runs
the same checks before writing, so a head that would be refused is never written.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from sklearn.utils.validation import check_is_fitted

from pipeline.config import SELECT_BY
from pipeline.errors import CheckpointError, ConfigError
from pipeline.fusion.heads.base import BASE_FITTED, HEADS, POSITIVE, Head, make_head
from pipeline.metrics import write_json
from pipeline.storage.atomic import atomic_dir
from pipeline.storage.outputs import ArtifactFolder

HEAD_FILE, SIDECAR_FILE, SEEDS_FILE, SEEDS_DIR = (
    "head.safetensors",
    "head.json",
    "seeds.json",
    "seeds",
)
# what `--out` of `defuse fuse` may replace: an earlier head folder, nothing else
HEAD_FOLDER = ArtifactFolder.of("head", SIDECAR_FILE, HEAD_FILE, SEEDS_FILE, SEEDS_DIR)
MAX_JSON_DEPTH = 32  # a head.json nests 4 deep (an MLP's history); deeper is not a head
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


@dataclass(frozen=True)
class SeedRefits:
    """The seed study of one head: refitted, selection included, with each of ``seeds``.

    The saved head itself is the refit with ``seed`` (fuse.seed); ``heads`` holds the
    others, seed -> (head, sidecar). A head without random state has ``seeds == (seed,)``.
    seeds.json holds `to_json()`: {"seed": int, "seeds": [int, ...]}.
    """

    seed: int
    seeds: tuple[int, ...]
    heads: dict[int, tuple[Head, dict]] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "seeds": list(self.seeds)}

    @classmethod
    def from_json(cls, data: Any, where: Path) -> SeedRefits:
        """The record in ``data`` (parsed ``where``); CheckpointError naming it otherwise."""
        ok = isinstance(data, dict) and set(data) == {"seed", "seeds"}
        seeds = data.get("seeds") if ok else None
        ok = ok and _is_seed(data["seed"]) and isinstance(seeds, list) and len(seeds) > 0
        if not ok or not all(map(_is_seed, seeds)) or len(set(seeds)) != len(seeds):
            raise CheckpointError(
                f"{where} must be {{'seed': int >= 0, 'seeds': [distinct ints >= 0]}}; "
                f"got {_short(data)}."
            )
        return cls(data["seed"], tuple(seeds))

    def refit_dirs(self, directory: Path) -> dict[int, Path]:
        """Seed -> the folder of its head under the head's ``directory``."""
        return {
            s: directory if s == self.seed else directory / SEEDS_DIR / str(s) for s in self.seeds
        }


def save_head(head: Head, directory: Path | str, sidecar: dict, *, seed_refits: SeedRefits) -> Path:
    """Write ``head`` to ``directory``: head.json (``sidecar``, which must name the
    ``backbones``, their ``dims`` and the ``class_names``; the head's name, params, classes
    and learned JSON state), head.safetensors (its arrays), seeds.json and each refit of
    ``seed_refits`` in seeds/<seed>/ the same way.

    Everything is checked as `load_head` checks it, then written to a temporary folder
    that replaces ``directory`` whole: an error or a kill leaves the previous head untouched.
    """
    directory = Path(directory)
    others = set(seed_refits.seeds) - {seed_refits.seed}
    if set(seed_refits.heads) != others:
        raise ConfigError(
            f"{directory}: seed refits given for seeds {sorted(seed_refits.heads)}, but the "
            f"study's seeds other than the head's own ({seed_refits.seed}) are {sorted(others)}."
        )
    parts = {Path(): _parts(head, sidecar, directory)}
    for seed, (refit, refit_sidecar) in seed_refits.heads.items():
        where = directory / SEEDS_DIR / str(seed)
        parts[where.relative_to(directory)] = _parts(refit, refit_sidecar, where)
    with atomic_dir(directory) as tmp:
        write_json(tmp / SEEDS_FILE, seed_refits.to_json())
        for sub, (meta, arrays) in parts.items():
            (tmp / sub).mkdir(parents=True, exist_ok=True)
            write_json(tmp / sub / SIDECAR_FILE, meta)
            save_file(arrays, str(tmp / sub / HEAD_FILE))
    return directory


def load_head(directory: Path | str) -> tuple[Head, dict[str, Any]]:
    """The head saved by `save_head` in ``directory`` and its sidecar (the head.json
    mapping), validated: JSON of bounded depth, a registered head with valid params, the
    learned state its class expects, classes within ``class_names``, every array finite
    and of the shape the params, the backbones' ``dims`` and the classes give.
    CheckpointError naming the file and what is wrong otherwise. Nothing is unpickled.
    """
    directory = Path(directory)
    paths = directory / HEAD_FILE, directory / SIDECAR_FILE
    if (directory / "head.joblib").exists() and not paths[0].exists():
        raise CheckpointError(
            f"{directory / 'head.joblib'} is a pickled head from an older defuse; pickles are "
            f"not loaded (they can run code). Re-run `defuse fuse {directory.name}`."
        )
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(f"Fitted head incomplete: missing {missing}.")
    meta = _read_json(paths[1])
    try:
        arrays = load_file(str(paths[0]))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{paths[0]} is not a safetensors file: {exc}") from exc
    return _restore(meta, arrays, directory), meta


def load_seed_heads(directory: Path | str) -> dict[int, Head]:
    """Seed -> the head refitted with it (`SeedRefits`), in seeds.json's order, each loaded
    by `load_head` and refused unless it is the same head on the same backbones and classes."""
    directory = Path(directory)
    head, sidecar = load_head(directory)
    path = directory / SEEDS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the head's seed refits are part of it; re-run "
            f"`defuse fuse {sidecar['head']}` (or `dvc repro`)."
        )
    study = SeedRefits.from_json(_read_json(path), path)
    heads = {}
    for seed, where in study.refit_dirs(directory).items():
        if where == directory:
            heads[seed] = head
            continue
        heads[seed], refit_sidecar = load_head(where)
        check_head_fits(
            refit_sidecar,
            class_names=sidecar["class_names"],
            backbones=sidecar["backbones"],
            where=where,
        )
        if refit_sidecar["head"] != sidecar["head"] or refit_sidecar["dims"] != sidecar["dims"]:
            raise CheckpointError(
                f"{where} holds a {refit_sidecar['head']!r} head on widths "
                f"{refit_sidecar['dims']}, not a refit of {directory}'s {sidecar['head']!r} "
                f"head on {sidecar['dims']}."
            )
    return heads


def check_head_fits(
    sidecar: dict, *, class_names: list[str], backbones: list[str], where: Path | str
) -> None:
    """CheckpointError unless the head saved in ``where`` (``sidecar`` from `load_head`)
    predicts exactly ``class_names`` (order included) from exactly ``backbones`` (order
    included): what its user (caches, checkpoints) provides."""
    if list(sidecar["backbones"]) != list(backbones):
        raise CheckpointError(
            f"Head {where} was trained on backbones {sidecar['backbones']} (in that order), "
            f"but it is used with {list(backbones)}; re-run `defuse fuse {sidecar['head']}`."
        )
    if list(sidecar["class_names"]) != list(class_names):
        raise CheckpointError(
            f"Head {where} predicts {len(sidecar['class_names'])} classes "
            f"{sidecar['class_names']} (in that order), but it is used with "
            f"{len(class_names)}: {list(class_names)}; re-run `defuse fuse {sidecar['head']}`."
        )


def chosen_val_scores(sidecar: dict, where: Path | str) -> dict[str, float]:
    """The val scores of the head's chosen candidate before its refit (selection.chosen_val,
    one per `fuse.select_by` choice, higher is better), which evaluate.final_head "auto"
    ranks heads by; CheckpointError naming the head otherwise."""
    selection = sidecar.get("selection")
    scores = selection.get("chosen_val") if isinstance(selection, dict) else None
    ok = isinstance(scores, dict) and all(
        isinstance(scores.get(m), int | float) and math.isfinite(scores[m]) for m in SELECT_BY
    )
    if not ok:
        raise CheckpointError(
            f"{Path(where) / SIDECAR_FILE}: selection.chosen_val must give a number for each of "
            f"{list(SELECT_BY)} (an older defuse made it without); re-run `defuse fuse "
            f"{sidecar['head']}` (or `dvc repro`)."
        )
    return {m: float(scores[m]) for m in SELECT_BY}


def _parts(head: Head, sidecar: dict, where: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(head.json mapping, arrays) of ``head``, checked as `load_head` will check them."""
    check_is_fitted(head, "classes_")
    fitted = {k: getattr(head, k) for k in (*BASE_FITTED, *head._fitted_json)}
    meta = {
        **sidecar,
        "head": head.name,
        "params": head.get_params(),
        "classes": head.classes_.tolist(),
        "fitted": fitted,
        "versions": {"sklearn": sklearn.__version__, "torch": torch.__version__},
    }
    arrays = {k: np.ascontiguousarray(v) for k, v in head._arrays().items()}
    _restore(json.loads(json.dumps(meta)), arrays, where)  # as it will read back
    return meta, arrays


def _restore(meta: dict, arrays: dict[str, np.ndarray], where: Path) -> Head:
    """The head that ``meta`` and ``arrays`` describe, every part checked."""
    sidecar = where / SIDECAR_FILE
    _check_sidecar(meta, sidecar)
    try:
        head = make_head(meta["head"], **meta["params"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{sidecar}: its params do not make a head: {exc}") from exc
    head.classes_ = np.asarray(meta["classes"])
    for key, value in meta["fitted"].items():
        setattr(head, key, value)
    _check_fit(head, meta, sidecar)
    _check_arrays(arrays, head._array_shapes(), where / HEAD_FILE)
    head._set_arrays(arrays)
    return head


def _check_sidecar(meta: dict, path: Path) -> None:
    """The keys every reader relies on, with their types: ValueError-free from here on."""
    problems = []
    names, backbones, dims = meta.get("class_names"), meta.get("backbones"), meta.get("dims")
    if meta.get("head") not in HEADS:
        problems.append(f"'head' {_short(meta.get('head'))} is not a registered head {list(HEADS)}")
    if not isinstance(meta.get("params"), dict):
        problems.append(f"'params' must be a mapping, got {_short(meta.get('params'))}")
    if not _list_of(names, str) or len(set(names)) != len(names):
        problems.append(f"'class_names' must be a list of distinct str, got {_short(names)}")
    if not _list_of(backbones, str):
        problems.append(f"'backbones' must be a non-empty list of str, got {_short(backbones)}")
    if not _list_of(dims, int) or len(dims) != len(backbones or ()) or min(dims) < 1:
        problems.append(f"'dims' must be one int >= 1 per backbone, got {_short(dims)}")
    problems += _class_problems(meta.get("classes"), names)
    if not problems:
        problems += _fitted_problems(meta, HEADS[meta["head"]])
    if problems:
        raise CheckpointError(f"{path} is not a head sidecar: {'; '.join(problems)}.")


def _class_problems(classes: Any, names: Any) -> list[str]:
    n = len(names) if isinstance(names, list) else 0
    ok = _list_of(classes, int) and len(classes) >= 2 and classes[0] >= 0
    if ok and all(a < b for a, b in itertools.pairwise(classes)) and classes[-1] < n:
        return []
    return [
        f"'classes' must be >= 2 increasing labels in [0, {n}) ({n} class_names), "
        f"got {_short(classes)}"
    ]


def _fitted_problems(meta: dict, cls: type[Head]) -> list[str]:
    """'fitted' names exactly the learned JSON state of ``cls``: never a method, never
    anything that `setattr` would let replace behaviour."""
    fitted, expected = meta.get("fitted"), {*BASE_FITTED, *cls._fitted_json}
    if not isinstance(fitted, dict) or set(fitted) != expected:
        keys = sorted(fitted) if isinstance(fitted, dict) else _short(fitted)
        return [f"'fitted' must name exactly {sorted(expected)}, got {keys}"]
    if not POSITIVE[0](fitted["temperature_"]):
        return [f"'temperature_' must be {POSITIVE[1]}, got {_short(fitted['temperature_'])}"]
    width = fitted["n_features_in_"]
    want = (
        sum(meta["dims"])
        if cls.input == "embeddings"
        else len(meta["backbones"]) * len(meta["class_names"])
    )
    if width != want or isinstance(width, bool):
        return [f"'n_features_in_' is {_short(width)}, but its {cls.input} are {want} wide"]
    dims = meta["params"].get("block_dims")
    if dims is not None and dims != meta["dims"]:
        return [f"params' block_dims {_short(dims)} differ from the backbones' dims {meta['dims']}"]
    return []


def _check_fit(head: Head, meta: dict, path: Path) -> None:
    try:
        head._check_fitted_json()
    except ValueError as exc:
        raise CheckpointError(f"{path}: its learned state does not fit: {exc}.") from None


def _check_arrays(arrays: dict, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Exactly the arrays ``shapes`` names, of those shapes, floating point and finite."""
    if set(arrays) != set(shapes):
        raise CheckpointError(
            f"{path} holds arrays {sorted(arrays)}; the head needs exactly {sorted(shapes)}."
        )
    for name, shape in shapes.items():
        array = arrays[name]
        if array.shape != shape or not np.issubdtype(array.dtype, np.floating):
            raise CheckpointError(
                f"{path}: array {name!r} is {array.dtype} {array.shape}; the head's params, "
                f"widths and classes need a float array of shape {shape}."
            )
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise CheckpointError(
                f"{path}: array {name!r} holds {bad} NaN or infinite value(s); the head is "
                "unusable: re-run `defuse fuse` (a diverged fit shows in its history)."
            )


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, refused (CheckpointError) when it is not valid JSON,
    not an object, or nested deeper than MAX_JSON_DEPTH (which would exhaust the stack)."""
    try:
        text = path.read_text(encoding="utf-8")
        depth = _depth(text)
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested {depth} deep, over the {MAX_JSON_DEPTH} a head needs")
        meta = json.loads(text)
        if not isinstance(meta, dict):
            raise ValueError(f"expected an object, got {type(meta).__name__}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a head sidecar: {exc}") from None
    return meta


def _depth(text: str) -> int:
    """How deep the arrays and objects of JSON ``text`` nest (brackets in strings aside)."""
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", _STRING.sub('""', text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _list_of(value: Any, kind: type) -> bool:
    ok = isinstance(value, list) and len(value) > 0
    return ok and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)


def _is_seed(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: Any) -> str:
    """``value``'s repr, cut to a line: an error message never quotes a whole file."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
