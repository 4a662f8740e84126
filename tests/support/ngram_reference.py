"""A brute-force n-gram reference for the prior's tests: Counters over explicit contexts, full-vocabulary loops."""

from __future__ import annotations

from collections import Counter


def events(corpus: list[tuple[list[int], list[int]]], order: int, vocab: int, include_prompts: bool
           ) -> list[tuple[tuple[int, ...], int]]:
    """(context of order-1 tokens padded with id `vocab`, next token) for every counted token."""
    out = []
    for prompt, answer in corpus:
        seq = [vocab] * (order - 1) + list(prompt) + list(answer)
        first = 0 if include_prompts else len(prompt)
        for i in range(first, len(prompt) + len(answer)):
            out.append((tuple(seq[i:i + order - 1]), seq[i + order - 1]))
    return out


def counts(corpus: list[tuple[list[int], list[int]]], order: int, vocab: int, include_prompts: bool = False
           ) -> Counter:
    """c[(context suffix, w)] for every suffix length 0..order-1."""
    c: Counter = Counter()
    for ctx, w in events(corpus, order, vocab, include_prompts):
        for level in range(order):
            c[(ctx[len(ctx) - level:] if level else (), w)] += 1
    return c


def prob(c: Counter, ctx: tuple[int, ...], w: int, vocab: int, smoothing: str, beta: float, root: float) -> float:
    """Interpolated p(w | ctx) by the textbook recursion, straight from the counts."""
    total = Counter()
    types = Counter()
    for (h, _), n in c.items():
        total[h] += n
        types[h] += 1
    p = (c[((), w)] + root / vocab) / (total[()] + root)
    for level in range(1, len(ctx) + 1):
        h = ctx[len(ctx) - level:]
        n = total[h]
        if n == 0:
            continue
        b = types[h] if smoothing == "witten_bell" else beta
        p = (c[(h, w)] + b * p) / (n + b)
    return p
