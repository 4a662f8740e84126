"""Fresh starts and resumes: clear a stage's own outputs, or check that a resumed run has the same config."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .modeling import PipelineError

# Options that may change between an interrupted run and its resume without changing the result.
VOLATILE_OPTIONS = ("resume", "max_steps_this_run", "progress", "report_to", "log_every")


def run_options(options: dict[str, Any], exclude: Iterable[str] = VOLATILE_OPTIONS) -> dict[str, Any]:
    """The options that define a run, JSON-normalised (tuples become lists) so they compare with a stored copy."""
    skip = set(exclude)
    return json.loads(json.dumps({k: v for k, v in options.items() if k not in skip}, default=str))


def clear_outputs(paths: Iterable[Path], is_main: bool) -> None:
    """Delete files and directories left by an earlier run (main process only)."""
    if not is_main:
        return
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()


def start_run(path: Path, info: dict[str, Any], resume: bool, is_main: bool, stage: str) -> None:
    """Record the run's options in `path`; with `resume`, first refuse options that differ from the stored ones."""
    info = run_options(info, exclude=())
    if resume and path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
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
