"""Black-box teacher: collect completions from an OpenAI-compatible API, and serve a local teacher.

Collection-side names import only light dependencies; server-side names (which need torch
and transformers) are imported on first use.
"""

from __future__ import annotations

from typing import Any

from .client import RetryPolicy, TeacherClient
from .collect import CollectConfig, CollectError, CollectSummary, acollect, collect
from .prompts import prompt_hash, read_prompts
from .store import load_failures, load_records, repair_jsonl, to_dataset, to_parquet

_LAZY = {
    "TeacherServer": ".server",
    "FaultConfig": ".faults",
    "GenerationEngine": ".engine",
    "load_preset": ".presets",
    "load_teacher": ".presets",
    "tiny_teacher": ".tiny",
}

__all__ = [
    "CollectConfig",
    "CollectError",
    "CollectSummary",
    "collect",
    "acollect",
    "TeacherClient",
    "RetryPolicy",
    "load_records",
    "load_failures",
    "to_dataset",
    "to_parquet",
    "repair_jsonl",
    "prompt_hash",
    "read_prompts",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Import server-side names lazily so the collector starts without loading torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
