"""The start every stage shares: checks that need no model, one accelerator (the device), the seed, the run dir.

`start_stage` runs before any model is loaded (a missing reporter package fails here, not after
minutes of loading); `open_run` runs once the inputs have loaded: it decides what `--resume`
means for this output dir (true / auto / false), clears a fresh run's outputs, records the run's
identity (or checks it against the interrupted run's) and saves the config next to the outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from proxykd_fast.options import alias_map

from .config import StageConfig, TrainConfig
from .metrics import check_reporters
from .runinfo import clear_outputs, path_options, run_identity, start_run


def make_accelerator() -> Any:
    """An `accelerate.Accelerator` (CPU when no GPU); works unchanged under `accelerate launch`/torchrun."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)


def notice(acc: Any, message: str) -> None:
    """A line for the user on stderr (main process only): resumes, fallbacks, fresh starts."""
    import sys

    if acc is None or acc.is_main_process:
        print(message, file=sys.stderr, flush=True)


def start_stage(cfg: StageConfig, accelerator: Any = None) -> Any:
    """Refuse what can be refused before loading (reporters), seed torch, and return the stage's accelerator."""
    if isinstance(cfg, TrainConfig):
        check_reporters(cfg.report_to)
    acc = accelerator or make_accelerator()
    seed = getattr(cfg, "seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    return acc


def resume_option(cfg: StageConfig) -> bool | str:
    """The stage's resume option: `resume_from_checkpoint` (training) or `resume` (precompute)."""
    return cfg.resume_from_checkpoint if isinstance(cfg, TrainConfig) else getattr(cfg, "resume", False)


def open_run(cfg: StageConfig, acc: Any, *, stage: str, out: Path, record: str,
             clear: Iterable[Path] = (), identity_keys: Iterable[str] | None = None,
             config_name: str | None = None, sync: bool = True) -> bool:
    """Prepare `out` for this run and return whether it resumes.

    resume false: `clear` is deleted and a new run recorded. true: the recorded run must exist and
    match. auto: as true when a run is recorded, else as false (and says so). `sync` False: called
    by the main process alone, so no barrier.
    """
    option = resume_option(cfg)
    resume = bool(option)
    if option == "auto" and not (out / record).exists():
        notice(acc, f"[{stage}] --resume auto: no {stage} run is recorded in {out}: starting a new run")
        resume = False
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        clear_outputs([out / record, *clear], acc.is_main_process)
    if sync:
        acc.wait_for_everyone()
    start_run(out / record, run_identity(cfg, identity_keys), resume, acc.is_main_process, stage,
              paths=path_options(cfg), aliases=alias_map(type(cfg)))
    if config_name and acc.is_main_process:
        cfg.save(out / config_name)
    return resume


__all__ = ["make_accelerator", "notice", "open_run", "start_stage"]
