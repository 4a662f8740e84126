"""Config fields both trainers add to TRL's configs: the fused loss's chunking, backend and token metrics."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from proxykd_fast.losses import BACKENDS

from .metrics import TOKEN_METRICS


def chunk_size_field(unit: str) -> Any:
    """`chunk_size`: rows (KD) or tokens (DPO) per logits chunk; None picks one from the memory budget."""
    return field(default=None, metadata={"help": f"{unit} per logits chunk (None: automatic)."})


def backend_field() -> Any:
    """`backend`: which implementation of the fused losses runs."""
    return field(default="auto", metadata={"help": f"Loss backend, one of {BACKENDS}."})


def token_metrics_field() -> Any:
    """`token_metrics`: when entropy / mean_token_accuracy are computed (see metrics.token_metrics_due)."""
    return field(default="logging_steps", metadata={
        "help": "entropy / mean_token_accuracy (one no-grad GEMM pass): on logged steps, every_step, or off."})


def check_fused_options(cfg: Any) -> None:
    """ValueError naming the option when backend / token_metrics / chunk_size is not one we take."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {cfg.backend!r}")
    if cfg.token_metrics not in TOKEN_METRICS:
        raise ValueError(f"token_metrics must be one of {TOKEN_METRICS}, got {cfg.token_metrics!r}")
    c = cfg.chunk_size
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {c!r}")
