"""The start every stage shares: checks that need no model, one accelerator (the device), the seed, the run dir.

`start_stage` runs before any model is loaded (a missing reporter package fails here, not after
minutes of loading); `open_run` runs once the inputs have loaded: it decides what `--resume`
means for this output dir (true / auto / false), clears a fresh run's outputs, records the run's
identity (or checks it against the interrupted run's) and saves the config next to the outputs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

from proxykd_fast.options import alias_map

from .config import StageConfig, TrainConfig
from .metrics import check_reporters
from .modeling import PipelineError, check_attn_implementation
from .runinfo import clear_outputs, option_defaults, path_options, run_identity, start_run

C = TypeVar("C", bound=StageConfig)


def make_accelerator() -> Any:
    """An `accelerate.Accelerator` (CPU when no GPU); works unchanged under `accelerate launch`/torchrun.

    Its own mixed precision stays off: the stages autocast themselves (or set FSDP's policy) from
    --mixed-precision, which adopts an `accelerate launch` config's setting (`launch_settings`).
    """
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False, mixed_precision="no")


def notice(acc: Any, message: str) -> None:
    """A line for the user on stderr (main process only): resumes, fallbacks, fresh starts."""
    import sys

    if acc is None or acc.is_main_process:
        print(message, file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool | None:
    """An accelerate launch environment flag as a bool (None when unset)."""
    value = os.environ.get(name)
    return None if value is None else value.strip().lower() in ("1", "true", "yes")


def launch_settings(cfg: C) -> C:
    """`cfg` with what an `accelerate launch` config set (mixed_precision, FSDP) adopted where the flags left it
    unset; a launch setting that contradicts a flag, or that the stages cannot honour, is refused by name."""
    changes: dict[str, Any] = {}
    launch_mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if launch_mp not in ("no", "bf16", "fp16"):
        raise PipelineError(f"accelerate launch config: mixed_precision {launch_mp!r} is not supported (no, bf16 "
                            "or fp16)")
    if launch_mp != "no" and cfg.mixed_precision == "no":
        changes["mixed_precision"] = launch_mp
    elif launch_mp not in ("no", cfg.mixed_precision):
        raise PipelineError(f"the accelerate launch config sets mixed_precision {launch_mp!r} but --mixed-precision "
                            f"is {cfg.mixed_precision!r}: set one of them")
    if _env_flag("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise PipelineError(f"the accelerate launch config uses FSDP version {version}: the stages run FSDP2 "
                                "only; set fsdp_version: 2 (see examples/accelerate/)")
        if _env_flag("FSDP_OFFLOAD_PARAMS"):
            raise PipelineError("the accelerate launch config sets fsdp_offload_params: true, which the stages do "
                                "not support yet; shard over more processes instead")
        mode = "shard_grad_op" if _env_flag("FSDP_RESHARD_AFTER_FORWARD") is False else "full_shard"
        if not cfg.fsdp:
            changes["fsdp"] = mode
        elif cfg.fsdp != mode:
            raise PipelineError(f"the accelerate launch config shards as {mode} (fsdp_reshard_after_forward) but "
                                f"--fsdp is {cfg.fsdp!r}: set one of them")
        if _env_flag("FSDP_ACTIVATION_CHECKPOINTING") and isinstance(cfg, TrainConfig) \
                and not cfg.gradient_checkpointing:
            changes["gradient_checkpointing"] = True
    if not changes:
        return cfg
    return dataclasses.replace(cfg, **changes)


def start_stage(cfg: C, accelerator: Any = None) -> tuple[C, Any]:
    """Refuse what can be refused before loading (reporters, attention kernel), adopt the launch config's settings,
    seed torch, and return the stage's config and accelerator."""
    cfg = launch_settings(cfg)
    if isinstance(cfg, TrainConfig):
        check_reporters(cfg.report_to)
    check_attn_implementation(cfg.attn_implementation)
    acc = accelerator or make_accelerator()
    if cfg.fsdp and acc.device.type not in ("cpu", "cuda"):
        raise PipelineError(f"--fsdp runs on CUDA GPUs or CPU processes (gloo), not on {acc.device.type}")
    seed = getattr(cfg, "seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    return cfg, acc


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
              paths=path_options(cfg), aliases=alias_map(type(cfg)), defaults=option_defaults(cfg))
    if config_name and acc.is_main_process:
        cfg.save(out / config_name)
    return resume


__all__ = ["launch_settings", "make_accelerator", "notice", "open_run", "start_stage"]
