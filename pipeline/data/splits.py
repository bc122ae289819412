"""Train / val / test assignment: stratified by class (x cell type), seeded, each
near-duplicate group moving as one unit, splits given by a labels file kept as given."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import PrepareParams
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.data.sources import Entry

SPLITS = ("train", "val", "test")


def assign_splits(
    entries: list[Entry],
    groups: list[list[int]],
    class_names: tuple[str, ...],
    params: PrepareParams,
) -> list[str]:
    """One split name per entry: given splits as given, the others drawn, stratified by class
    (x cell type) and seeded, with each near-duplicate group moving as one unit.

    Test is drawn from the undecided images (test_fraction) unless some entry is given
    "test"; val likewise from what trains (val_fraction of the undecided rest and the given
    "train" entries) unless some entry is given "val"; the rest is train. So a fixed test
    set stays exactly as given, and a group whose members are given different splits is cut
    along them (`_units`).
    """
    units = _units(entries, groups)
    # what each unit holds of each stratum: a group may span classes
    holds = [Counter(f"{entries[i].label}|{entries[i].group}" for i in u) for u in units]
    split = [next((entries[i].split for i in u if entries[i].split), "") for u in units]
    fixed = set(split)
    draws = [("test", params.test_fraction, "", "val + train")] if "test" not in fixed else []
    if "val" not in fixed:
        draws.append(("val", params.val_fraction, "train", "train"))

    drawn_from = {"", *(also for _, _, also, _ in draws)}  # "train" when val is drawn
    counts = sum((h for h, s in zip(holds, split, strict=True) if s in drawn_from), Counter())
    if draws:
        _check_sizes(counts, [d[0] for d in draws], {e.label for e in entries}, class_names, params)
    rng = np.random.default_rng(params.seed)
    for name, fraction, also, rest in draws:
        pool = [u for u, s in enumerate(split) if s in ("", also)]
        chosen = set(_draw(pool, fraction, holds, rng))
        for u in chosen:
            split[u] = name
        for part, members in ((name, chosen), (rest, set(pool) - chosen)):
            _check_reached(part, name, pool, members, holds, counts, groups, class_names)
    out = [""] * len(entries)
    for unit, s in zip(units, split, strict=True):
        for i in unit:
            out[i] = s or "train"
    _check_given(entries, out, class_names, params)
    return out


def _check_reached(
    part: str,
    drawn: str,
    pool: list[int],
    members: set[int],
    holds: list[Counter],
    counts: Counter,
    groups: list[list[int]],
    class_names: tuple[str, ...],
) -> None:
    """DataError unless ``part`` (the ``drawn`` split, or what is left of its pool) holds
    every stratum of the pool: a draw can miss one when near-duplicate groups are large."""
    missing = sorted({s for u in pool for s in holds[u]} - {s for u in members for s in holds[u]})
    if not missing:
        return
    largest = max((len(g) for g in groups), default=0)
    fraction = f"{drawn}_fraction"
    advice = f"raise {fraction}" if part == drawn else f"lower {fraction}"
    raise DataError(
        f"The stratified split left no {part} image for "
        + ", ".join(f"{_stratum(s, class_names)} ({counts[s]} images)" for s in missing)
        + f"; add images or {advice}"
        + (
            f" (near-duplicate groups move whole, the largest has {largest} images)."
            if largest
            else "."
        )
    )


def _check_given(
    entries: list[Entry], out: list[str], class_names: tuple[str, ...], params: PrepareParams
) -> None:
    """Drawn splits always reach every split and class; given ones are checked here."""
    trained = {e.label for e, s in zip(entries, out, strict=True) if s == "train"}
    gaps = [f"no {s} image" for s in SPLITS if s not in out]
    gaps += [
        f"no train image of class {n!r}" for i, n in enumerate(class_names) if i not in trained
    ]
    if gaps:
        raise DataError(
            f"The splits given in {params.labels} leave {'; '.join(gaps)}: give some rows that "
            "split, or leave their split empty to have it drawn."
        )


def _stratum(key: str, class_names: tuple[str, ...]) -> str:
    label, group = key.split("|")
    name = class_names[int(label)]
    return f"class {name!r} ({group} cells)" if group else f"class {name!r}"


def _shares(drawn: list[str], t: float, v: float) -> dict[str, float]:
    """The share of a stratum that each split gets when ``drawn`` ("test" and / or "val")
    are drawn from it and the rest trains."""
    if drawn == ["test", "val"]:
        return {"test": t, "val": (1 - t) * v, "train": (1 - t) * (1 - v)}
    if drawn == ["test"]:
        return {"test": t, "train": 1 - t}
    return {"val": v, "train": 1 - v}


def _check_sizes(
    counts: Counter,
    drawn: list[str],
    present: set[int],
    class_names: tuple[str, ...],
    params: PrepareParams,
) -> None:
    """Every stratum drawn from (``counts``: its images) must be big enough to reach each
    split it is drawn into (``drawn``: "test" and / or "val") and train, and no class empty."""
    t, v = params.test_fraction, params.val_fraction
    shares = _shares(drawn, t, v)
    scarcest = min(shares, key=shares.get)
    needed = math.ceil(1 / shares[scarcest] - 1e-9)
    small = [s for s in sorted(counts) if counts[s] < needed]
    small += [f"{i}|" for i in range(len(class_names)) if i not in present]
    if not small:
        return
    parts = ["train", *reversed(drawn)]
    raise DataError(
        "Too few images to stratify: "
        + "; ".join(f"{_stratum(s, class_names)} has {counts[s]}" for s in small)
        + f". With test_fraction={t} and val_fraction={v} each needs at least {needed} "
        f"so that {', '.join(parts[:-1])} and {parts[-1]} all get one; add images or "
        f"{_advice(scarcest, drawn, t)} (now {shares[scarcest]:.2g} of each goes to {scarcest})."
    )


def _advice(scarcest: str, drawn: list[str], t: float) -> str:
    """Which fraction to move so that the ``scarcest`` split grows: raising a fraction helps
    only the split it draws, and a test split over a third starves val and train alike."""
    if scarcest in drawn and not (scarcest == "val" and "test" in drawn and t > 1 / 3):
        return f"raise {scarcest}_fraction"
    if "test" in drawn and (t > 1 / 3 or "val" not in drawn):
        return "lower test_fraction"
    return "lower val_fraction"


def _units(entries: list[Entry], groups: list[list[int]]) -> list[list[int]]:
    """What moves between splits as one: every entry alone, except that each near-duplicate
    group is one unit per split given among its members, its undecided members joining its
    given train rows (if any) or forming a unit of their own."""
    units, grouped = [], set()
    for group in groups:
        parts: dict[str, list[int]] = {}
        for i in group:
            parts.setdefault(entries[i].split, []).append(i)
        if "" in parts and "train" in parts:  # given test and val take no other rows
            parts["train"] += parts.pop("")
        units += [sorted(members) for members in parts.values()]
        grouped.update(group)
    units += [[i] for i in range(len(entries)) if i not in grouped]
    return sorted(units)


def _draw(pool: list[int], fraction: float, holds: list[Counter], rng) -> list[int]:
    """Units of ``pool`` holding ceil(fraction x its images) images, stratified: each stratum
    gets its share (largest remainders), filled by walking the units in a seeded random order
    and taking each that still fits every stratum's room, so a group never overshoots and
    single images top up exactly."""
    counts = sum((holds[u] for u in pool), Counter())
    if not counts:
        return []
    names = sorted(counts)
    sizes = np.array([counts[n] for n in names], dtype=np.int64)
    target = math.ceil(fraction * sizes.sum() - 1e-9)  # scikit-learn's rounding of a share
    exact = sizes * target / sizes.sum()
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(quota - exact, kind="stable")[: target - quota.sum()]] += 1
    room = dict(zip(names, quota.tolist(), strict=True))
    chosen = []
    for u in rng.permutation(pool).tolist():
        if all(room[s] >= k for s, k in holds[u].items()):
            chosen.append(u)
            room.update({s: room[s] - k for s, k in holds[u].items()})
    return chosen
