"""Read and validate a prompts JSONL file; hash prompts so collection can resume."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Message = dict[str, Any]
Prompt = str | list[Message]
Mode = Literal["chat", "completions"]

_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


class PromptsError(ValueError):
    """Raised when the prompts file is missing or holds lines we were told to refuse."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt read from the file: the normalised prompt, its optional id and line number."""

    prompt: Prompt
    prompt_id: str | None
    line_no: int


@dataclass
class BadLine:
    """A prompts-file line that could not be used, with the reason."""

    line_no: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.reason}"


@dataclass
class PromptsFile:
    """The usable prompts of a file plus the lines that were rejected."""

    path: Path
    items: list[PromptItem] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)


def canonical_json(obj: Any) -> str:
    """Serialise `obj` deterministically (sorted keys, no spaces) so equal prompts hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prompt_hash(prompt: Prompt, sample_index: int = 0) -> str:
    """Return the sha256 that identifies one (prompt, sample index) unit across runs."""
    payload = canonical_json({"prompt": prompt, "sample_index": sample_index})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _check_messages(messages: Any) -> list[Message]:
    """Validate a list of chat messages; raise ValueError with a readable reason."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out: list[Message] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} is not an object")
        role = msg.get("role")
        if role not in _ROLES:
            raise ValueError(f"message {i} has an invalid role {role!r}")
        content = msg.get("content")
        if not isinstance(content, (str, list)):
            raise ValueError(f"message {i} has no string content")
        out.append(dict(msg))
    return out


def _type_name(value: Any) -> str:
    """A JSON-flavoured name for a value's type, for error messages."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def check_unicode(value: Any, what: str) -> None:
    """Raise ValueError if a string inside `value` cannot be UTF-8 encoded (a lone surrogate).

    JSON allows escapes such as "\\ud800" that decode to half of a surrogate pair: valid JSON
    but not valid Unicode, so the prompt could be neither hashed nor written back out.
    """
    try:
        canonical_json(value).encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(exc.object[exc.start])
        raise ValueError(
            f"{what} holds a lone surrogate U+{code:04X} (a \\u escape that is not valid Unicode)"
        ) from None


def normalize_record(obj: Any, mode: Mode) -> tuple[Prompt, str | None]:
    """Turn one parsed JSONL object into (prompt, id) for `mode`; raise ValueError if unusable."""
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object")
    raw_id = obj.get("id")
    prompt_id = None if raw_id is None else str(raw_id)
    if prompt_id is not None:
        check_unicode(prompt_id, '"id"')
    prompt, prompt_id = _normalize_prompt(obj, mode, prompt_id)
    check_unicode(prompt, "the prompt")
    return prompt, prompt_id


def _normalize_prompt(obj: dict[str, Any], mode: Mode, prompt_id: str | None) -> tuple[Prompt, str | None]:
    """The prompt of one record: a string (completions, or a chat user turn) or chat messages."""
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty")
            if mode == "chat":
                return [{"role": "user", "content": prompt}], prompt_id
            return prompt, prompt_id
        if not isinstance(prompt, list):
            raise ValueError(f'"prompt" is {_type_name(prompt)}; expected a string or a list of messages')
        messages = _check_messages(prompt)
    elif "messages" in obj:
        if not isinstance(obj["messages"], list):
            raise ValueError(f'"messages" is {_type_name(obj["messages"])}; expected a list of messages')
        messages = _check_messages(obj["messages"])
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the reference answer is not part of the prompt
        if not messages:
            raise ValueError("messages hold only an assistant turn")
    else:
        raise ValueError('line has neither "prompt" nor "messages"')
    if mode == "completions":
        raise ValueError("completions mode needs a string prompt, got chat messages")
    return messages, prompt_id


def read_prompts(path: str | Path, mode: Mode = "chat") -> PromptsFile:
    """Read a prompts JSONL file, keeping good lines and recording bad ones (bad UTF-8 too) with line numbers.

    Lines are split and parsed by `proxykd_fast.jsonl` (a BOM on line 1 is dropped; a last line cut
    off mid-write is dropped with a warning, as for every JSONL file of the package).
    """
    from proxykd_fast.jsonl import iter_lines

    path = Path(path)
    if not path.is_file():
        raise PromptsError(f"prompts file not found: {path}")
    result = PromptsFile(path=path)
    for line in iter_lines(path):
        if line.error is not None:
            result.bad_lines.append(BadLine(line.line_no, line.error))
            continue
        try:
            prompt, prompt_id = normalize_record(line.value, mode)
        except ValueError as exc:
            result.bad_lines.append(BadLine(line.line_no, str(exc)))
            continue
        result.items.append(PromptItem(prompt=prompt, prompt_id=prompt_id, line_no=line.line_no))
    return result


def format_bad_lines(path: Path, bad_lines: list[BadLine], limit: int = 20) -> str:
    """Render bad lines as `file:line: reason` text, capped at `limit` entries."""
    shown = [f"{path}:{b.line_no}: {b.reason}" for b in bad_lines[:limit]]
    if len(bad_lines) > limit:
        shown.append(f"... and {len(bad_lines) - limit} more")
    return "\n".join(shown)
