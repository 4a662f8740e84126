"""Shape one teacher answer into a dataset record (TRL prompt/completion or messages format)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from .client import Completion, Mode
from .errors import Failure
from .prompts import Prompt

RecordFormat = Literal["prompt_completion", "messages"]

# Fields that legitimately differ between two runs of the same deterministic collection.
VOLATILE_FIELDS = ("request_id", "response_id", "latency_s", "created_at", "attempts")


@dataclass(frozen=True)
class Unit:
    """One request to make: a prompt, its sample index and the hash that identifies both."""

    prompt: Prompt
    prompt_id: str | None
    sample_index: int
    prompt_hash: str
    line_no: int


def build_record(
    unit: Unit,
    completion: Completion,
    *,
    mode: Mode,
    fmt: RecordFormat,
    model: str,
    attempts: int,
    latency_s: float,
) -> dict[str, Any]:
    """Return the JSON record for a completed unit, with prompt hash, usage and timing metadata.

    Chat mode writes TRL conversational data (messages, or prompt/completion message lists); completions
    mode writes plain-text prompt/completion strings. fmt="messages" needs chat mode: a completions-mode
    answer followed the raw prompt text, and wrapping that text as a user turn would make consumers
    render it with a chat template the teacher never saw (ValueError).
    """
    if fmt == "messages" and mode != "chat":
        raise ValueError("fmt='messages' needs mode='chat': completions-mode records stay plain text "
                         "(use fmt='prompt_completion')")
    if mode == "chat":
        answer: Any = [{"role": "assistant", "content": completion.text}]
    else:
        answer = completion.text
    if fmt == "messages":
        body: dict[str, Any] = {"messages": list(unit.prompt) + [{"role": "assistant", "content": completion.text}]}
    else:
        body = {"prompt": unit.prompt, "completion": answer}
    body.update(
        {
            "id": unit.prompt_id,
            "prompt_hash": unit.prompt_hash,
            "sample_index": unit.sample_index,
            "model": completion.model or model,
            "finish_reason": completion.finish_reason,
            "usage": completion.usage,
            "request_id": completion.request_id,
            "response_id": completion.response_id,
            "attempts": attempts,
            "latency_s": round(latency_s, 4),
            "created_at": round(time.time(), 3),
        }
    )
    return body


def build_failure(unit: Unit, failure: Failure, attempts: int, retry_reasons: list[str]) -> dict[str, Any]:
    """Return the JSON line logged for a unit that could not be completed."""
    return {
        "prompt_hash": unit.prompt_hash,
        "sample_index": unit.sample_index,
        "id": unit.prompt_id,
        "line_no": unit.line_no,
        "kind": failure.kind,
        "reason": failure.reason,
        "attempts": attempts,
        "retry_reasons": retry_reasons,
        "created_at": round(time.time(), 3),
    }


def strip_volatile(record: dict[str, Any]) -> dict[str, Any]:
    """Drop timing/ids so records from two runs can be compared for equality."""
    return {k: v for k, v in record.items() if k not in VOLATILE_FIELDS}
