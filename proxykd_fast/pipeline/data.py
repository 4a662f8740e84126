"""Teacher data: load TRL-format records, apply chat templates, tokenize with prompt labels = -100."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

IGNORE = -100
FALLBACK_TEMPLATE = "<|{role}|>\n{content}\n"
FALLBACK_GENERATION_PROMPT = "<|assistant|>\n"


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read records from a JSONL/JSON/parquet file, a `collect` output dir or a saved `datasets` dir."""
    p = Path(path)
    if p.is_dir():
        if (p / "records.jsonl").exists():
            return _dedupe(_read_jsonl(p / "records.jsonl"))
        if (p / "dataset_info.json").exists() or (p / "state.json").exists():
            import datasets

            return list(datasets.load_from_disk(str(p)))
        files = sorted(p.glob("*.jsonl")) + sorted(p.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no records.jsonl, *.jsonl or *.parquet in {p}")
        return [r for f in files for r in load_records(f)]
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else list(data.get("data", []))
    return _read_jsonl(p)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL file, skipping blank lines and a truncated last line."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def _dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the first record per prompt hash (collect output may hold retried duplicates)."""
    seen: set[Any] = set()
    out = []
    for r in rows:
        key = (r.get("prompt_hash"), r.get("sample_index"))
        if key[0] is not None and key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out


def _text(content: Any) -> str:
    """Flatten OpenAI message content to a string."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def split_record(rec: dict[str, Any]) -> tuple[Any, str, str | None]:
    """(prompt, chosen completion text, rejected text or None) of a TRL-format record."""
    if "messages" in rec and "prompt" not in rec:
        msgs = list(rec["messages"])
        if not msgs or msgs[-1].get("role") != "assistant":
            raise ValueError("a messages record must end with an assistant turn")
        return msgs[:-1], _text(msgs[-1]["content"]), None
    if "prompt" not in rec:
        raise ValueError(f"record has neither prompt nor messages: keys {sorted(rec)}")
    answer = rec.get("completion", rec.get("chosen"))
    if answer is None:
        raise ValueError("record has a prompt but no completion/chosen")
    rejected = rec.get("rejected")
    return rec["prompt"], _answer_text(answer), None if rejected is None else _answer_text(rejected)


def _answer_text(answer: Any) -> str:
    """The assistant text of a completion given as a string or a list of messages."""
    if isinstance(answer, list):
        return "".join(_text(m.get("content")) for m in answer if m.get("role", "assistant") == "assistant")
    return _text(answer)


def prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of a prompt: chat template with generation prompt for messages, plain text otherwise."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    msgs = [{"role": m["role"], "content": _text(m.get("content"))} for m in prompt]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"]) for m in msgs)
    return list(tokenizer(text + FALLBACK_GENERATION_PROMPT, add_special_tokens=True)["input_ids"])


def completion_ids(tokenizer: Any, text: str, add_eos: bool) -> list[int]:
    """Token ids of an answer, with eos appended when the answer ended naturally."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class Example:
    """One tokenized sample: prompt ids, answer ids and an optional rejected answer."""

    index: int
    prompt: list[int]
    answer: list[int]
    rejected: list[int] | None = None
    prompt_text: Any = None


def tokenize_records(
    records: list[dict[str, Any]], tokenizer: Any, max_length: int, start_index: int = 0
) -> list[Example]:
    """Tokenize records into Examples; answers are truncated so prompt + answer <= max_length."""
    out = []
    for i, rec in enumerate(records):
        prompt, answer, rejected = split_record(rec)
        add_eos = rec.get("finish_reason") not in ("length",)
        p = prompt_ids(tokenizer, prompt)
        room = max(1, max_length - len(p))
        if len(p) >= max_length:
            p = p[-(max_length - 1):]
        a = completion_ids(tokenizer, answer, add_eos)[:room]
        r = None if rejected is None else completion_ids(tokenizer, rejected, True)[:room]
        out.append(Example(start_index + i, p, a, r, prompt))
    return out


def pad_batch(seqs: list[list[int]], prompt_lens: list[int], pad_id: int) -> dict[str, Tensor]:
    """Right-padded input_ids / attention_mask and shifted labels (labels[t] = token t+1 of the answer)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for row, (s, plen) in enumerate(zip(seqs, prompt_lens)):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
        if len(s) > plen:
            labels[row, plen - 1 : len(s) - 1] = torch.tensor(s[plen:], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_batch(examples: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Batch of prompt + teacher answer rows."""
    return pad_batch([e.prompt + e.answer for e in examples], [len(e.prompt) for e in examples], pad_id)


def preference_batch(examples: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Batch of 2B rows: chosen (teacher) rows first, then rejected rows, for the DPO loss."""
    seqs = [e.prompt + e.answer for e in examples] + [e.prompt + (e.rejected or []) for e in examples]
    plens = [len(e.prompt) for e in examples] * 2
    return pad_batch(seqs, plens, pad_id)


def left_padded_prompts(examples: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Left-padded prompt ids and mask, for batched generation."""
    width = max(len(e.prompt) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, width - len(e.prompt) :] = torch.tensor(e.prompt, dtype=torch.long)
        mask[row, width - len(e.prompt) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The sample order of one epoch, a pure function of (seed, epoch) so resumes see the same order."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def batch_indices(n: int, batch_size: int, step: int, seed: int, shuffle: bool = True) -> list[int]:
    """Indices of the `step`-th global batch of a stream of shuffled epochs (data position = step)."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        pos = start + len(out)
        epoch, offset = divmod(pos, n)
        perm = epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
    return out


def iter_chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive slices of at most `size` items."""
    for i in range(0, len(items), size):
        yield items[i : i + size]
