"""Fresh starts and resumes: clear a stage's own outputs, or check that a resumed run has the same options.

A run's identity is the options that decide its result. Where its outputs go (`output_dir`) and
how it is watched (progress, reporters, logging cadence, checkpoint retention) are not part of it,
so a run directory can be respelled (`./run`, an absolute path) or moved and still resume. Options
that name local files are compared as resolved absolute paths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .modeling import PipelineError

# Options that may change between an interrupted run and its resume without changing the result.
VOLATILE_OPTIONS = ("resume", "resume_from_checkpoint", "max_steps_this_run", "progress", "report_to",
                    "logging_steps", "log_every", "output_dir", "save_total_limit")


def canonical_path(value: Any) -> Any:
    """An existing local path as its resolved absolute form; anything else (a Hub id, None) unchanged."""
    if not isinstance(value, str) or not value:
        return value
    p = Path(value).expanduser()
    return str(p.resolve()) if os.path.exists(p) else value


def path_options(cfg: Any) -> set[str]:
    """Names of the config options that hold local paths (the config class's PATH_OPTIONS)."""
    return set(getattr(cfg, "PATH_OPTIONS", ()))


def run_options(options: dict[str, Any], exclude: Iterable[str] = VOLATILE_OPTIONS,
                paths: Iterable[str] = ()) -> dict[str, Any]:
    """The options that define a run, JSON-normalised (tuples become lists), paths resolved, so they compare."""
    skip, as_path = set(exclude), set(paths)
    kept = {k: canonical_path(v) if k in as_path else v for k, v in options.items() if k not in skip}
    return json.loads(json.dumps(kept, default=str))


def option_defaults(cfg: Any) -> dict[str, Any]:
    """The config class's default value of every option (dataclass fields), JSON-normalised like an identity."""
    defaults = {}
    for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else ():
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return run_options(defaults, exclude=())


def run_identity(cfg: Any, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The identity of the run `cfg` describes: its result-deciding options (all but VOLATILE_OPTIONS, or `keys`)."""
    options = cfg.to_dict()
    if keys is not None:
        wanted = set(keys)
        options = {k: v for k, v in options.items() if k in wanted}
    return run_options(options, paths=path_options(cfg))


def clear_outputs(paths: Iterable[Path], is_main: bool) -> None:
    """Delete files and directories left by an earlier run (main process only)."""
    if not is_main:
        return
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()


def start_run(path: Path, info: dict[str, Any], resume: bool, is_main: bool, stage: str,
              paths: Iterable[str] = (), aliases: dict[str, str] | None = None,
              defaults: dict[str, Any] | None = None) -> None:
    """Record the run's identity in `path`; with `resume`, first refuse a missing record or options that differ.

    Records written by older versions may hold volatile options (output_dir) and old option names
    (`aliases`, e.g. batch_size): the first are ignored, the second renamed, and their path options
    resolved like today's before comparing. An option a record lacks (added to the stage after the
    run was recorded) matches when the current value is its default (`defaults`): the old run ran
    with that behaviour.
    """
    info = run_options(info, exclude=())
    if resume:
        if not path.exists():
            raise PipelineError(
                f"{stage} --resume: nothing to resume in {path.parent}: no {stage} run is recorded there "
                f"({path.name} is missing); run without --resume to start a new run")
        stored = {(aliases or {}).get(k, k): v for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
        stored = run_options(stored, paths=paths)
        for k, v in (defaults or {}).items():
            if k not in stored and k in info and info[k] == v:
                stored[k] = v
        diff = sorted(k for k in set(stored) | set(info) if stored.get(k) != info.get(k))
        if diff:
            detail = "; ".join(f"{k}: stored {stored.get(k)!r}, now {info.get(k)!r}" for k in diff)
            raise PipelineError(
                f"{stage} --resume: the options differ from the interrupted run recorded in {path} ({detail}); "
                "resume with the original options, or run without --resume to start fresh"
            )
        return
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
        tmp.replace(path)
