"""Coerce and validate config option values (from YAML, flags or Python) with errors that name the option."""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Iterable
from typing import Any

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def describe_type(hint: Any) -> str:
    """A readable name of an annotation, e.g. 'an integer or null'."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        inner = " or ".join(describe_type(a) for a in args if a is not type(None))
        return inner + (" or null" if type(None) in args else "")
    if origin is dict or hint is dict:
        return "a mapping"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def coerce(option: str, value: Any, hint: Any) -> Any:
    """`value` converted to the annotated type `hint`, or a ValueError naming `option` and what it expects."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(option, value, arg)
            except ValueError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else _bad(option, value, hint)
    if hint is bool:
        return _to_bool(option, value)
    if hint is int:
        return _to_int(option, value)
    if hint is float:
        return _to_float(option, value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _bad(option, value, hint, " (quote the value in YAML)")
    if hint is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if isinstance(value, dict):
            return value
        raise _bad(option, value, hint)
    return value


def _bad(option: str, value: Any, hint: Any, extra: str = "") -> ValueError:
    """The error for a value of the wrong type."""
    return ValueError(f"option {option!r} expects {describe_type(hint)}, got {value!r} "
                      f"({type(value).__name__}){extra}")


def _to_bool(option: str, value: Any) -> bool:
    """A bool from a bool, 0/1 or a yes/no string."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _bad(option, value, bool)


def _to_int(option: str, value: Any) -> int:
    """An int from an int, an integral float or a numeric string ('1e3' included)."""
    if isinstance(value, bool):
        raise _bad(option, value, int)
    if isinstance(value, int):
        return value
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value.strip())
            except ValueError:
                raise _bad(option, value, int) from None
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise _bad(option, value, int)


def _to_float(option: str, value: Any) -> float:
    """A float from a number or a numeric string such as '1e-5' (YAML reads that as a string)."""
    if isinstance(value, bool):
        raise _bad(option, value, float)
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _bad(option, value, float) from None
    else:
        raise _bad(option, value, float)
    if math.isnan(number):
        raise ValueError(f"option {option!r} must be a number, got NaN")
    return number


def check_choice(option: str, value: Any, choices: Iterable[Any]) -> None:
    """Refuse a value outside `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"option {option!r} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_range(option: str, value: float | int | None, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a number outside [low, high] (open ends when asked); None passes."""
    if value is None:
        return
    bad = (low is not None and (value <= low if low_open else value < low)) or \
          (high is not None and (value >= high if high_open else value > high)) or not math.isfinite(value)
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        expect = f"in {lo}, {hi}" if low is not None and high is not None else (
            f"{'>' if low_open else '>='} {low}" if low is not None else f"{'<' if high_open else '<='} {high}")
        raise ValueError(f"option {option!r} must be a finite number {expect}; got {value!r}")


def check_split_spec(option: str, spec: str) -> None:
    """Refuse a split that is not 'a:b' with numbers (fractions, or counts when > 1)."""
    parts = spec.split(":")
    ok = len(parts) in (1, 2)
    for p in parts if ok else []:
        if p.strip():
            try:
                ok = ok and float(p) >= 0
            except ValueError:
                ok = False
    if not ok:
        raise ValueError(f"option {option!r} must look like 'start:stop' (fractions such as 0.55:1, or counts); "
                         f"got {spec!r}")
