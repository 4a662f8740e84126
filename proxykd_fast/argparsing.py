"""One command-line mechanism for every `proxykd` command: TRL's parser over a config dataclass.

`ConfigParser` is a `trl.TrlParser` (a `transformers.HfArgumentParser`) for one dataclass: a flag
per field (`--learning_rate` and `--learning-rate`, plus the field's aliases), `--config
file.yaml` whose values become the defaults that flags override (a TRL YAML works as is, with its
`env:` block), and on top of it: unknown YAML keys and flags answered with the closest valid name,
YAML and flag values coerced with errors that name the option, JSON for mapping options, and
errors raised as `ConfigError` rather than exiting, so callers report them their own way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from trl import TrlParser

from .options import closest, coerce, field_aliases, resolve_names


class ConfigError(ValueError):
    """A bad command line or config file (unknown option, bad value, unreadable YAML)."""


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; ConfigError for a missing file, bad YAML or a non-mapping."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a YAML mapping of options, got {type(data).__name__}")
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options of a YAML config file, after setting the environment variables of its `env:` block (TRL's
    convention)."""
    data = load_yaml_mapping(path)
    env = data.pop("env", None)
    if env is not None:
        if not isinstance(env, dict):
            raise ConfigError(f"{path}: 'env' must be a mapping of environment variables")
        os.environ.update({str(k): str(v) for k, v in env.items()})
    return data


def coerce_mapping(cls: type, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`data` keyed by field names with each value coerced to its field's type; errors name the key as written."""
    names = resolve_names(cls, data, where)
    written = {canonical: key for key, canonical in zip(data, names)}
    hints = typing.get_type_hints(cls)
    try:
        return {k: coerce(written[k], v, hints[k]) for k, v in names.items()}
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


def config_from_mapping(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build config `cls` from a mapping (names or aliases; values coerced; unknown keys refused)."""
    values = coerce_mapping(cls, data, where)
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


def _converter(name: str, hint: Any) -> Any:
    """An argparse `type` turning one flag string into the field's type (JSON for mappings, null for None)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    inner = [a for a in args if a is not type(None)] or [hint]
    mapping = any(a is dict or typing.get_origin(a) is dict for a in inner)
    listing = any(typing.get_origin(a) is list for a in inner)

    def convert(text: str) -> Any:
        if optional and text.strip().lower() == "null":
            return None
        try:
            if listing:  # one element of a nargs="+" list: keep it a string
                return coerce(name, text, str)
            return coerce(name, text, dict if mapping else hint)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in "invalid <type> value" messages
    return convert


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option (HfArgumentParser's choice); description and epilog kept as written."""


class ConfigParser(TrlParser):
    """Flags and `--config` YAML for one config dataclass; `parse(argv)` returns the config."""

    def __init__(self, config_class: type | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # no silent prefix matches: typos get "did you mean"
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_types=[config_class] if config_class is not None else None, **kwargs)
        self.config_class = config_class
        if config_class is None:  # a plain argparse parser (an argparse-only subcommand)
            return
        self.add_argument("--config", metavar="YAML", default=None,
                          help="YAML file of options (field names or their aliases; a TRL config works); flags "
                               "given here override it")

    def _add_dataclass_arguments(self, dtype: Any) -> None:
        """HfArgumentParser's flags, then each flag's type replaced by one that coerces like the dataclass.

        The field's default is set on its flag too: HfArgumentParser leaves it unset for a `str | list`
        field (such as report_to), and the first action of a dest decides the parsed default.
        """
        super()._add_dataclass_arguments(dtype)
        hints = typing.get_type_hints(dtype)
        fields = {f.name: f for f in dataclasses.fields(dtype) if f.init}
        seen: set[str] = set()
        for action in self._actions:
            f = fields.get(action.dest)
            if f is None:
                continue
            if action.type is not None:
                action.type = _converter(action.dest, hints[action.dest])
            if action.dest not in seen:
                seen.add(action.dest)
                if f.default is not dataclasses.MISSING:
                    action.default = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    action.default = f.default_factory()
        for f in fields.values():  # HfArgumentParser adds --no-<name> for a True-by-default bool; its aliases too
            negatives = [flag for a in field_aliases(f)
                         for flag in dict.fromkeys((f"--no-{a.replace('_', '-')}", f"--no_{a}"))]
            if f.default is True and hints[f.name] is bool and negatives:
                self.add_argument(*negatives, action="store_false", dest=f.name,
                                  help=f"same as --no-{f.name.replace('_', '-')}")

    def error(self, message: str) -> typing.NoReturn:
        """Raise ConfigError instead of printing usage and exiting."""
        raise ConfigError(f"{self.prog}: {message}")

    def option_strings(self) -> list[str]:
        """Every long flag this parser accepts."""
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def parse(self, args: Sequence[str]) -> Any:
        """The config from `--config` YAML (if any) with the flags applied on top."""
        if self.config_class is None:
            raise TypeError(f"{self.prog} has no config class to parse into")
        args = list(args)
        path = _pop_config(args)
        if path is not None:
            self.set_defaults_with_config(**coerce_mapping(self.config_class, read_config_file(path), where=path))
        known = set(self.option_strings())
        unknown = [a for a in args if a.startswith("--") and len(a) > 2 and a.split("=", 1)[0] not in known]
        if unknown:  # before argparse, whose "required" errors would hide the likelier cause, a typo
            raise ConfigError(f"{self.prog}: unrecognized arguments: {' '.join(unknown)}{self._hint(unknown)}")
        namespace, rest = self.parse_known_args(args)
        if rest:
            raise ConfigError(f"{self.prog}: unrecognized arguments: {' '.join(rest)}{self._hint(rest)}")
        values = {k: v for k, v in vars(namespace).items() if k != "config"}
        return self.config_class(**values)

    def _hint(self, rest: list[str]) -> str:
        """' (did you mean --x?)' for the first unknown flag, when one is close."""
        flags = [a.split("=", 1)[0] for a in rest if a.startswith("--")]
        close = closest(flags[0], self.option_strings()) if flags else None
        return f" (did you mean {close}?)" if close else ""


@dataclass(frozen=True)
class Command:
    """A subcommand: the config dataclass it parses, the function it runs on it (returning an exit code)."""

    config: type
    run: Callable[[Any], int]
    help: str
    description: str | None = None
    epilog: str | None = None


def build_command_parser(prog: str, description: str, commands: dict[str, Command]) -> argparse.ArgumentParser:
    """A parser with one ConfigParser subcommand per command (for --help; `run_command` parses)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ConfigParser)
    for name, c in commands.items():
        sub.add_parser(name, config_class=c.config, help=c.help, description=c.description or c.help, epilog=c.epilog)
    return parser


def subcommand_parser(parser: argparse.ArgumentParser, name: str) -> ConfigParser:
    """The ConfigParser of subcommand `name`."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def run_command(parser: argparse.ArgumentParser, commands: dict[str, Command], argv: Sequence[str],
                errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse `argv` (subcommand first) and run it; a bad command line or one of `errors` prints 'error: ...', exit 2."""
    argv = list(argv)
    try:
        if not argv or argv[0] not in commands:
            parser.parse_args(argv)  # --help, or argparse's own error for a missing / unknown subcommand
            return 2
        config = subcommand_parser(parser, argv[0]).parse(argv[1:])
        return int(commands[argv[0]].run(config) or 0)
    except (ConfigError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _pop_config(args: list[str]) -> str | None:
    """Remove `--config PATH` (or `--config=PATH`) from args and return PATH."""
    for i, a in enumerate(args):
        if a == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a YAML file path")
            path = args[i + 1]
            del args[i : i + 2]
            return path
        if a.startswith("--config="):
            del args[i]
            return a.split("=", 1)[1]
    return None


__all__ = ["Command", "ConfigError", "ConfigParser", "build_command_parser", "config_from_mapping",
           "load_yaml_mapping", "read_config_file", "run_command", "subcommand_parser"]
