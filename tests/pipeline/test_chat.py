"""Chat formats: TRL messages, prompt/completion and prompt/chosen/rejected records with a chat template."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from proxykd_fast.demo.world import build_tokenizer
from proxykd_fast.pipeline.chat import end_of_turn_ids, split_record, stop_token_ids
from proxykd_fast.pipeline.data import preference_batch, tokenize_records
from proxykd_fast.teacher.chat_format import render_chat
from proxykd_fast.teacher.client import Completion
from proxykd_fast.teacher.records import Unit, build_record

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPT = [{"role": "system", "content": "t0"}, {"role": "user", "content": "t1 t2"}]


def chat_tokenizer() -> Any:
    """The demo's word-level tokenizer plus ChatML specials and a chat template (eos stays <eos>)."""
    tok = build_tokenizer(20)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["system", "user", "assistant"])
    tok.chat_template = CHATML
    return tok


def collected(prompt: Any, text: str, fmt: str, finish: str = "stop") -> dict[str, Any]:
    """A record exactly as the teacher collector writes it in chat mode."""
    unit = Unit(prompt=prompt, prompt_id="0", sample_index=0, prompt_hash="h", line_no=1)
    done = Completion(text=text, finish_reason=finish, usage={}, response_id=None, model="m", request_id=None)
    return build_record(unit, done, mode="chat", fmt=fmt, model="m", attempts=1, latency_s=0.0)


def ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_end_of_turn_token_comes_from_the_template() -> None:
    tok = chat_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.eos_token_id
    assert end_of_turn_ids(tok) == [im_end]
    assert set(stop_token_ids(tok)) == {tok.eos_token_id, im_end}
    plain = build_tokenizer(20)
    assert end_of_turn_ids(plain) == [plain.eos_token_id]


def test_messages_and_prompt_completion_records_tokenize_alike() -> None:
    tok = chat_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    want_prompt = ids(tok, tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False))
    assert want_prompt == render_chat(tok, PROMPT)  # what the teacher server fed the teacher
    records = [collected(PROMPT, "t3 t4", "messages"), collected(PROMPT, "t3 t4", "prompt_completion")]
    assert isinstance(records[1]["completion"], list)  # chat mode writes TRL conversational data
    for ex in tokenize_records(records, tok, 64):
        assert ex.prompt == want_prompt
        assert ex.answer == ids(tok, "t3 t4") + [im_end]
    # The teacher stopped at max_tokens: no end-of-turn token.
    (cut,) = tokenize_records([collected(PROMPT, "t3 t4", "prompt_completion", finish="length")], tok, 64)
    assert cut.answer == ids(tok, "t3 t4")


def test_string_prompt_with_conversational_completion_is_one_user_turn() -> None:
    tok = chat_tokenizer()
    rec = {"prompt": "t1 t2", "completion": [{"role": "assistant", "content": "t3"}]}
    prompt, answer, rejected = split_record(rec)
    assert prompt == [{"role": "user", "content": "t1 t2"}] and answer == "t3" and rejected is None
    (ex,) = tokenize_records([rec], tok, 64)
    (ref,) = tokenize_records([collected([{"role": "user", "content": "t1 t2"}], "t3", "prompt_completion")], tok, 64)
    assert ex.prompt == ref.prompt and ex.answer == ref.answer


def test_plain_text_records_stay_plain_with_eos() -> None:
    tok = chat_tokenizer()
    (ex,) = tokenize_records([{"prompt": "t1 t2", "completion": "t3"}], tok, 64)
    assert ex.prompt == list(tok("t1 t2")["input_ids"]) and ex.answer == ids(tok, "t3") + [tok.eos_token_id]


def test_completions_mode_records_stay_plain_text() -> None:
    """The teacher saw the raw prompt text: its record must not get a chat template in the pipeline."""
    tok = chat_tokenizer()
    unit = Unit(prompt="t1 t2", prompt_id="0", sample_index=0, prompt_hash="h", line_no=1)
    done = Completion(text="t3 t4", finish_reason="stop", usage={}, response_id=None, model="m", request_id=None)
    rec = build_record(unit, done, mode="completions", fmt="prompt_completion", model="m", attempts=1, latency_s=0.0)
    assert rec["prompt"] == "t1 t2" and rec["completion"] == "t3 t4"
    (ex,) = tokenize_records([rec], tok, 64)
    assert ex.prompt == list(tok("t1 t2")["input_ids"]) and ex.answer == ids(tok, "t3 t4") + [tok.eos_token_id]
    assert tok.convert_tokens_to_ids("<|im_start|>") not in ex.prompt
    # A messages record would be rendered with the template the teacher never saw: refused.
    with pytest.raises(ValueError, match="fmt='messages' needs mode='chat'"):
        build_record(unit, done, mode="completions", fmt="messages", model="m", attempts=1, latency_s=0.0)


def test_preference_records_end_both_answers_with_end_of_turn() -> None:
    tok = chat_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rec = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "t3 t4"}],
           "rejected": [{"role": "assistant", "content": "t5"}]}
    (ex,) = tokenize_records([rec], tok, 64)
    assert ex.answer == ids(tok, "t3 t4") + [im_end] and ex.rejected == ids(tok, "t5") + [im_end]
    b = preference_batch([ex], tok.pad_token_id)
    last = [int(row[row != -100][-1]) for row in b["labels"]]
    assert last == [im_end, im_end]
    with pytest.raises(ValueError, match="prompt must be a string or a list"):
        split_record({"prompt": [1, 2], "completion": "t3"})


class _FakeGenerator(torch.nn.Module):
    """Stands in for a causal LM: `generate` appends fixed rows after the prompt."""

    def __init__(self, rows: list[list[int]]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.rows = rows
        self.kwargs: dict[str, Any] = {}

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.kwargs = kwargs
        return torch.cat([input_ids, torch.tensor(self.rows[: input_ids.shape[0]])], dim=1)


def test_rejected_samples_stop_at_end_of_turn() -> None:
    from proxykd_fast.pipeline.align import generate_rejected
    from proxykd_fast.pipeline.config import AlignProxyConfig

    tok = chat_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    examples = tokenize_records([collected(PROMPT, "t3", "prompt_completion")] * 2, tok, 64)
    fake = _FakeGenerator([[7, 8, im_end, 9, 9], [7, 7, 7, 7, 7]])
    cfg = AlignProxyConfig(gen_top_k=5, gen_batch_size=4, progress=False)
    out = generate_rejected(fake, tok, examples, cfg, seed=0)
    assert out == [[7, 8, im_end], [7, 7, 7, 7, 7]]
    assert fake.kwargs["top_k"] == 5 and im_end in fake.kwargs["eos_token_id"]


def test_server_and_pipeline_stop_on_the_same_tokens() -> None:
    """One stop_token_ids (tokenizer, model) for generation everywhere: the server stops at <|im_end|> too."""
    from proxykd_fast.teacher import chat_format

    tok = chat_tokenizer()

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 2]))
    assert stop_token_ids(tok, model) == chat_format.stop_token_ids(tok, model)
    assert stop_token_ids(tok, model) == [7, 2, tok.convert_tokens_to_ids("<|im_end|>")]
