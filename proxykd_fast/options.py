"""Config options: declare dataclass fields with help and aliases, resolve names, coerce and check values.

A config is a dataclass whose fields carry `help` and, optionally, `aliases` (argparse option
strings such as `--batch-size`) in their metadata: exactly what `transformers.HfArgumentParser`
reads. `config_dataclass` makes the same aliases work as Python keywords and YAML keys, and refuses
unknown names with the closest valid one ("did you mean"). Values from YAML, flags or Python are
coerced to the annotated types (YAML reads `1e-5` as a string) with errors that name the option.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class UnknownOptionError(ValueError, TypeError):
    """An option name no config field or alias has (a ValueError for files, a TypeError for keywords)."""


def option(default: Any = dataclasses.MISSING, *, help: str, aliases: Sequence[str] = (),
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field: `help` for --help, `aliases` as plain names (e.g. "batch_size"), each also a flag."""
    metadata: dict[str, Any] = {"help": help}
    if aliases:
        flags: list[str] = []
        for name in aliases:
            flags += [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        metadata["aliases"] = flags
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def field_aliases(f: dataclasses.Field) -> list[str]:
    """The plain alias names of a field (from its argparse `aliases`, dashes read as underscores)."""
    flags = f.metadata.get("aliases") or []
    names = [a.lstrip("-").replace("-", "_") for a in ([flags] if isinstance(flags, str) else flags)]
    return list(dict.fromkeys(n for n in names if n != f.name))


@functools.cache
def alias_map(cls: type) -> dict[str, str]:
    """alias -> field name for a config dataclass."""
    return {alias: f.name for f in dataclasses.fields(cls) for alias in field_aliases(f)}


def option_names(cls: type) -> list[str]:
    """Every name a config accepts: its fields, then the aliases."""
    return [f.name for f in dataclasses.fields(cls) if f.init] + list(alias_map(cls))


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to `name` (difflib ratio >= 0.6), or None."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest candidate, or '' when none is close."""
    close = closest(name, candidates)
    return f" (did you mean {close!r}?)" if close else ""


def resolve_names(cls: type, values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """`values` keyed by field names: aliases renamed, unknown names and alias clashes refused."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    aliases = alias_map(cls)
    prefix = f"{where}: " if where else ""
    out: dict[str, Any] = {}
    via: dict[str, str] = {}
    for key, value in values.items():
        name = key if key in fields else aliases.get(key)
        if name is None:
            close = closest(key, option_names(cls))
            hint = "" if close is None else f" (did you mean {close!r}?)" if close in fields else \
                f" (did you mean {close!r}, an alias of {aliases[close]!r}?)"
            raise UnknownOptionError(f"{prefix}unknown {cls.__name__} option {key!r}{hint}")
        if name in out:
            raise ValueError(f"{prefix}option {name!r} given twice (as {via[name]!r} and {key!r})")
        out[name], via[name] = value, key
    return out


def config_dataclass(cls: type[T]) -> type[T]:
    """`dataclasses.dataclass`, and keywords may use the fields' aliases (unknown ones say "did you mean")."""
    cls = dataclasses.dataclass(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **resolve_names(type(self), kwargs))

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


# ----- values -----

def describe_type(hint: Any) -> str:
    """A readable name of an annotation, e.g. 'an integer or null'."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        inner = " or ".join(describe_type(a) for a in args if a is not type(None))
        return inner + (" or null" if type(None) in args else "")
    if origin is dict or hint is dict:
        return "a mapping"
    if origin is list or hint is list:
        return "a list"
    if hint is Path:
        return "a path"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def coerce(option_name: str, value: Any, hint: Any) -> Any:
    """`value` converted to the annotated type `hint`, or a ValueError naming the option and what it expects."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(option_name, value, arg)
            except ValueError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else _bad(option_name, value, hint)
    if hint is bool:
        return _to_bool(option_name, value)
    if hint is int:
        return _to_int(option_name, value)
    if hint is float:
        return _to_float(option_name, value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _bad(option_name, value, hint, " (quote the value in YAML)")
    if hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _bad(option_name, value, hint)
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise _bad(option_name, value, hint)
    if hint is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if isinstance(value, dict):
            return value
        raise _bad(option_name, value, hint)
    if hint is list or origin is list:
        (inner,) = typing.get_args(hint) or (Any,)
        if isinstance(value, (list, tuple)):
            return [v if inner is Any else coerce(option_name, v, inner) for v in value]
        raise _bad(option_name, value, hint)
    return value


def _bad(option_name: str, value: Any, hint: Any, extra: str = "") -> ValueError:
    """The error for a value of the wrong type."""
    return ValueError(f"option {option_name!r} expects {describe_type(hint)}, got {value!r} "
                      f"({type(value).__name__}){extra}")


def _to_bool(option_name: str, value: Any) -> bool:
    """A bool from a bool, 0/1 or a yes/no string."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _bad(option_name, value, bool)


def _to_int(option_name: str, value: Any) -> int:
    """An int from an int, an integral float or a numeric string ('1e3' included)."""
    if isinstance(value, bool):
        raise _bad(option_name, value, int)
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
                raise _bad(option_name, value, int) from None
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise _bad(option_name, value, int)


def _to_float(option_name: str, value: Any) -> float:
    """A float from a number or a numeric string such as '1e-5' (YAML reads that as a string)."""
    if isinstance(value, bool):
        raise _bad(option_name, value, float)
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _bad(option_name, value, float) from None
    else:
        raise _bad(option_name, value, float)
    if math.isnan(number):
        raise ValueError(f"option {option_name!r} must be a number, got NaN")
    return number


def coerce_fields(obj: Any) -> None:
    """Coerce every field of a dataclass instance to its annotated type, in place."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, coerce(f.name, getattr(obj, f.name), hints[f.name]))


# ----- checks -----

def check_choice(option_name: str, value: Any, choices: Iterable[Any]) -> None:
    """Refuse a value outside `choices` (naming the closest one)."""
    choices = tuple(choices)
    if value not in choices:
        hint = suggest(value, map(str, choices)) if isinstance(value, str) else ""
        raise ValueError(f"option {option_name!r} must be one of {', '.join(map(str, choices))}; got {value!r}{hint}")


def check_range(option_name: str, value: float | int | None, low: float | None = None, high: float | None = None,
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
        raise ValueError(f"option {option_name!r} must be a finite number {expect}; got {value!r}")


def check_split_spec(option_name: str, spec: str) -> None:
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
        raise ValueError(f"option {option_name!r} must look like 'start:stop' (fractions such as 0.55:1, or counts); "
                         f"got {spec!r}")
