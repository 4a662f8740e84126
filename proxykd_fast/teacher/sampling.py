"""Per-request token choice: greedy, or temperature/top-p sampling from the request's own generator."""

from __future__ import annotations

import hashlib
import secrets

import torch


def derive_seed(seed: int | None, prompt_ids: list[int], choice_index: int) -> int:
    """Seed for one choice: a hash of (seed, prompt tokens, choice index), or random if no seed.

    Hashing the prompt in makes a seeded request's output independent of which other
    requests it was batched with, and of the order they arrived in.
    """
    if seed is None:
        return secrets.randbits(63)
    text = f"{seed}|{choice_index}|" + ",".join(map(str, prompt_ids))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


def make_generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with `seed`."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def choose_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Pick the next token id from 1-D `logits`; temperature 0 means greedy (argmax)."""
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())
