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
