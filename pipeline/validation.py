"""Checking the values of a params section: each converted to its dataclass field's type,
then its range checked, every error naming the parameter, the value seen and what is
allowed (scikit-learn's wording)."""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from typing import Any

from pipeline.errors import ConfigError

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_KINDS = {bool: "true or false", int: "an int", float: "a number", str: "a string"}
_PLURAL = {bool: "bools", int: "ints", float: "numbers", str: "strings"}


def typed(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` converted to the types of ``cls``'s fields (list -> tuple, int -> float);
    ConfigError naming `prefix.key`, the value and the type wanted otherwise."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        try:
            out[key] = _convert(value, hints[key])
        except TypeError:
            raise ConfigError(
                f"{prefix}.{key} must be {_describe(hints[key])}; got {shown(value)}"
                f"{_hint(value, hints[key])}."
            ) from None
    return out


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``; TypeError when it is not one (True is not an int, the
    text "false" not a bool, 1.5 not an int)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is types.UnionType:  # X | None
        if value is None:
            return None
        return _convert(value, next(a for a in args if a is not type(None)))
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]: a YAML list
        if not isinstance(value, list | tuple):
            raise TypeError
        return tuple(_convert(v, args[0]) for v in value)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and number and isinstance(value, int):
        return value
    if hint is float and number and math.isfinite(value):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise TypeError


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is types.UnionType:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if typing.get_origin(hint) is tuple:
        return f"a list of {_PLURAL[args[0]]}"
    return _KINDS[hint]


def _hint(value: Any, hint: Any) -> str:
    """Why a text value that looks right is refused."""
    if not isinstance(value, str):
        return ""
    wanted = typing.get_args(hint) or (hint,)
    if bool in wanted and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return " (quoted, it is text: write true or false without quotes)"
    try:
        float(value)
    except ValueError:
        return ""
    if int in wanted or float in wanted:
        if "e" in value.lower() and "." not in value:  # YAML 1.1 needs the dot: 1e-3 is text
            return f" (YAML reads {value} as text: write it with a dot, e.g. 1.0e-3)"
        return " (quoted, it is text: write the number without quotes)"
    return ""


def shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(
            f"The {name!r} parameter must be one of {list(allowed)}. Got {value!r} instead."
        )


def check_open_unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(
            f"The {name!r} parameter must be a fraction in (0, 1). Got {value!r} instead."
        )


def check_probability(name: str, value: float) -> None:
    """A threshold a probability is compared with: in (0, 1] (no probability is below 0)."""
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be a probability in (0, 1]. Got {value!r}.")


def check_at_least(name: str, value: float, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}. Got {value!r}.")


def check_jobs(name: str, value: int) -> None:
    if value == 0:
        raise ConfigError(f"{name} must be an int >= 1, or -1 for every core. Got {value!r}.")


def check_device(name: str, value: str) -> None:
    if not _DEVICE.fullmatch(value):
        raise ConfigError(
            f"{name} must be 'auto', 'cpu', 'cuda' or 'cuda:<index>' (e.g. 'cuda:1'). "
            f"Got {value!r}."
        )


def unknown_names(what: str, names: list[str], allowed) -> str:
    """'unknown key(s) [...] (did you mean ...?); allowed: [...].' for ``names``."""
    guesses = [m for name in names for m in difflib.get_close_matches(name, allowed, 1)]
    guess = f" (did you mean {' / '.join(map(repr, guesses))}?)" if guesses else ""
    return f"unknown {what}(s) {names}{guess}; allowed: {sorted(allowed)}."
