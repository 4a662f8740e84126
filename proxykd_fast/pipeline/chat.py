"""TRL record formats to token ids: chat templates for conversational data, plain text otherwise.

The formats: prompt/completion, messages, language modeling (`text`: every token after the first is
trained), prompt/chosen/rejected, and implicit-prompt preference (chosen/rejected only: the prompt
is their shared prefix, split off by TRL's `maybe_extract_prompt`).

A record is conversational when its prompt is a list of messages, when it is a `messages` record,
or when its completion / chosen / rejected is a list of messages (the teacher collector's chat
mode writes `completion: [{"role": "assistant", ...}]`; a plain-string prompt next to such a
completion is taken as one user turn, as the collector itself does). Conversational prompts are
rendered exactly as the teacher server renders them (`teacher.chat_format.render_chat`: the
tokenizer's chat template with the generation prompt, or the same plain-text fallback), and their
answers end with the template's end-of-turn token (e.g. `<|im_end|>`) instead of eos.
"""

from __future__ import annotations

from typing import Any


def message_text(content: Any) -> str:
    """Message content as a string, flattened exactly as the teacher server does it."""
    if isinstance(content, str):
        return content
    from proxykd_fast.teacher.chat_format import message_text as flatten  # imported lazily: the teacher is heavy

    return flatten(content)


def is_conversational(value: Any) -> bool:
    """True for a non-empty list of {role, content} messages."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _messages(value: Any, what: str) -> list[dict[str, str]]:
    """Messages normalised to {role, content: str}, or a ValueError saying what was expected."""
    if not is_conversational(value):
        raise ValueError(f"{what} must be a string or a list of {{role, content}} messages, got {value!r:.80}")
    return [{"role": str(m["role"]), "content": message_text(m.get("content"))} for m in value]


def _answer_text(answer: Any) -> str:
    """The assistant text of a completion given as a string or a list of messages."""
    if isinstance(answer, list):
        return "".join(message_text(m.get("content")) for m in answer
                       if isinstance(m, dict) and m.get("role", "assistant") == "assistant")
    return message_text(answer)


def split_record(rec: dict[str, Any]) -> tuple[str | list[dict[str, str]] | None, str, str | None]:
    """(prompt, chosen answer text, rejected text or None); the prompt is a message list for chat data, None
    for a language-modeling (`text`) record."""
    if "messages" in rec and "prompt" not in rec:
        msgs = _messages(list(rec["messages"]), "messages")
        if msgs[-1]["role"] != "assistant":
            raise ValueError("a messages record must end with an assistant turn")
        return msgs[:-1], msgs[-1]["content"], None
    if "text" in rec and "prompt" not in rec and "chosen" not in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise ValueError(f"a language-modeling record needs a non-empty 'text' string, got {rec['text']!r:.80}")
        return None, rec["text"], None
    if "prompt" not in rec and "chosen" in rec and "rejected" in rec:
        from trl.data_utils import maybe_extract_prompt  # imported lazily: trl is heavy

        rec = {**rec, **maybe_extract_prompt({"chosen": rec["chosen"], "rejected": rec["rejected"]})}
        if not rec["prompt"]:
            raise ValueError("an implicit-prompt preference record's chosen and rejected share no prefix to use as "
                             "the prompt")
    if "prompt" not in rec:
        raise ValueError(f"record has neither prompt, messages, text nor chosen/rejected: keys {sorted(rec)}")
    answer = rec.get("completion", rec.get("chosen"))
    if answer is None:
        raise ValueError("record has a prompt but no completion/chosen")
    rejected = rec.get("rejected")
    prompt = rec["prompt"]
    chat = not isinstance(prompt, str) or any(is_conversational(x) for x in (answer, rejected))
    if chat:
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
    return prompt, _answer_text(answer), None if rejected is None else _answer_text(rejected)


def prompt_ids(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt: rendered like the teacher server (chat template + generation prompt) or plain text."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    from proxykd_fast.teacher.chat_format import render_chat

    return render_chat(tokenizer, _messages(prompt, "prompt"))


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Tokens that close an assistant turn in the chat template (e.g. <|im_end|>); [eos] when it has none."""
    from proxykd_fast.teacher.chat_format import end_of_turn_ids as ids  # one definition, shared with the server

    return ids(tokenizer)


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Ids that end generation: the model's and tokenizer's eos plus the chat template's end-of-turn token."""
    from proxykd_fast.teacher.chat_format import stop_token_ids as ids  # one definition, shared with the server

    return ids(tokenizer, model)


def completion_ids(tokenizer: Any, text: str, end: list[int]) -> list[int]:
    """Token ids of an answer followed by `end` (eos or the end-of-turn token; [] for a cut-off answer)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + list(end)
