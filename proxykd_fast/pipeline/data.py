"""Teacher data: tokenize TRL-format records (prompt labels = -100) and build padded batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .chat import completion_ids, end_of_turn_ids, prompt_ids, split_record
from .sources import count_records, iter_records, load_records

IGNORE = -100


@dataclass
class Example:
    """One tokenized sample: prompt ids, answer ids and an optional rejected answer."""

    index: int
    prompt: list[int]
    answer: list[int]
    rejected: list[int] | None = None
    prompt_text: Any = None
    language_modeling: bool = False  # a `text` record: prompt = its first token, answer = the rest


def tokenize_records(
    records: Iterable[dict[str, Any]], tokenizer: Any, max_length: int, start_index: int = 0
) -> list[Example]:
    """Tokenize records into Examples; answers are truncated so prompt + answer <= max_length.

    A plain-text answer ends with eos and a conversational one with the chat template's end-of-turn
    token, unless the teacher stopped at its length limit (finish_reason "length"). A language-modeling
    record (`text`) is tokenized whole (special tokens such as bos included) and ends with eos; its
    first token is the prompt, so every later token is trained.
    """
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    eot: list[int] | None = None
    out = []
    for i, rec in enumerate(records):
        prompt, answer, rejected = split_record(rec)
        if prompt is None:
            full = list(tokenizer(answer, add_special_tokens=True)["input_ids"])
            full = (full + ([] if rec.get("finish_reason") == "length" else eos))[:max_length]
            if len(full) < 2:
                raise ValueError(f"record {start_index + i}: its text has {len(full)} token(s), need at least 2")
            out.append(Example(start_index + i, full[:1], full[1:], None, None, language_modeling=True))
            continue
        if isinstance(prompt, str):
            end = eos
        else:
            eot = end_of_turn_ids(tokenizer) if eot is None else eot
            end = eot
        p = prompt_ids(tokenizer, prompt)
        room = max(1, max_length - len(p))
        if len(p) >= max_length:
            p = p[-(max_length - 1):]
        a = completion_ids(tokenizer, answer, [] if rec.get("finish_reason") == "length" else end)[:room]
        r = None if rejected is None else completion_ids(tokenizer, rejected, end)[:room]
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


def count_tokens(batch: dict[str, Any], rows: int | None = None) -> int:
    """Supervised tokens (labels != IGNORE) of a batch, or of its first `rows` rows."""
    labels = batch["labels"] if rows is None else batch["labels"][:rows]
    return int((labels != IGNORE).sum())


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


__all__ = [
    "IGNORE", "Example", "batch_indices", "count_records", "count_tokens", "epoch_permutation", "iter_chunks", "iter_records",
    "left_padded_prompts", "load_records", "pad_batch", "preference_batch", "sft_batch", "tokenize_records",
]
