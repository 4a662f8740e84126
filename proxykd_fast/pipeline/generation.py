"""Batched generation for the stages (align-proxy's rejected samples, eval's greedy samples), on any number of
processes and with FSDP-sharded models.

Prompts go in chunks of `batch_size`; chunk c is sampled under its own seed (seed, c), inside a forked
RNG, so the answers do not depend on how many processes share the chunks, nor disturb the training's
random stream. Under FSDP every decoding step is a collective: the processes run the same number of
`generate` calls (`map_tasks(lockstep=True)`) with transformers' `synced_gpus=True`, which keeps a
process whose sequences have all stopped stepping (without sampling) until every process is done.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .chat import stop_token_ids
from .data import Example, iter_chunks, left_padded_prompts
from .distributed import map_tasks
from .sharding import is_sharded, release

CHUNK_SEED_STRIDE = 7919  # chunk c samples with seed + c * stride


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of prompt chunk `chunk`."""
    return seed + CHUNK_SEED_STRIDE * chunk


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: Any, examples: list[Example], *, batch_size: int, seed: int,
                     acc: Any = None, progress: bool = False, desc: str = "generate",
                     **generate_kwargs: Any) -> list[list[int]]:
    """One answer per example's prompt (new tokens up to and including the first stop token), in order.

    `model` is a HiddenAndHead (its `generate` is FSDP-aware) or a causal LM; `generate_kwargs` go to
    `generate` (do_sample, temperature, max_new_tokens, ...).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lm = getattr(model, "model", model)
    stops = stop_token_ids(tokenizer, lm)
    chunks = list(iter_chunks(examples, batch_size))
    sharded = is_sharded(model)
    synced = sharded and acc is not None and acc.num_processes > 1
    devices = [device] if device.type == "cuda" else []

    def run(c: int) -> list[list[int]]:
        batch = left_padded_prompts(chunks[c], tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(chunk_seed(seed, c))
            gen = model.generate(**{k: v.to(device) for k, v in batch.items()}, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=stops, synced_gpus=synced, **generate_kwargs)
        width = batch["input_ids"].shape[1]
        out = []
        for row in gen[:, width:].tolist():
            ids: list[int] = []
            for t in row:
                ids.append(t)
                if t in stops:
                    break
            out.append(ids)
        return out

    show = progress and (acc is None or acc.is_main_process)
    with tqdm(total=len(examples), desc=desc, disable=not show, leave=False) as bar:
        try:
            parts = map_tasks(acc, len(chunks), run, lockstep=sharded,
                              after_round=lambda idx: bar.update(sum(len(chunks[i]) for i in idx)))
        finally:
            model.train(was_training)
            release([model])
    return [ids for part in parts for ids in part]


__all__ = ["chunk_seed", "generate_answers"]
