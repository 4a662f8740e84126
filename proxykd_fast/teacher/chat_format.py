"""Turn chat messages into prompt token ids with the tokenizer's chat template (or a fallback)."""

from __future__ import annotations

from typing import Any

# Used when the tokenizer has no chat template: one "<|role|>" header line per turn, then
# an open assistant header for the model to continue. Plain text, so any tokenizer handles it.
FALLBACK_TEMPLATE = "<|{role}|>\n{content}\n"
FALLBACK_GENERATION_PROMPT = "<|assistant|>\n"


def message_text(content: Any) -> str:
    """Flatten OpenAI message content (a string or a list of text parts) to a string."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return "" if content is None else str(content)


def with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, str]]:
    """Normalise messages and put the hidden server system prompt first (merged with a client one)."""
    msgs = [{"role": str(m["role"]), "content": message_text(m.get("content"))} for m in messages]
    if not system_prompt:
        return msgs
    if msgs and msgs[0]["role"] == "system":
        # Many templates accept a single system turn only, so merge instead of stacking two.
        return [{"role": "system", "content": system_prompt + "\n\n" + msgs[0]["content"]}] + msgs[1:]
    return [{"role": "system", "content": system_prompt}] + msgs


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` followed by the assistant generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages)
    return list(tokenizer(text + FALLBACK_GENERATION_PROMPT)["input_ids"])


_PROBE = "PROXYKDPROBEANSWER"


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Tokens that close an assistant turn in the chat template (e.g. <|im_end|>); [eos] when it has none."""
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if not getattr(tokenizer, "chat_template", None):
        return eos
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template may refuse the probe: fall back to eos
        return eos
    if not isinstance(text, str) or _PROBE not in text:
        return eos
    tail = text[text.rindex(_PROBE) + len(_PROBE):].strip()
    ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []
    return ids or eos


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Ids that end generation, in order and without repeats: the model's generation-config eos, the
    tokenizer's eos, and the chat template's end-of-turn token (used by the server and the pipeline alike)."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(tokenizer, "eos_token_id", None), end_of_turn_ids(tokenizer)[-1:] or None):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids
