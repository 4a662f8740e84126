"""A back-off n-gram index over teacher tokens: exact sparse counts in a reversed-context trie, vectorised lookups.

Every counted *event* is (context, next token), the context being the previous `order - 1` tokens with
a start sentinel (id V) before the first token. Counts of all shorter contexts follow from the
order-N ones by dropping the earliest tokens, so a shard stores only unique order-N rows and counts.

The index numbers contexts level by level (level L = contexts of L tokens, level 0 = the empty
context): a level-L context is (its level L-1 suffix, its earliest token), keyed
`gid(suffix) * (V + 1) + token`. Keys are sorted, so a whole suffix chain of many positions is found
with one `searchsorted` per level. The (context, next token) counts live in one table sorted by
`gid * V + token`. Leave-one-out statistics subtract a sequence's own events from those counts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

SMOOTHINGS = ("witten_bell", "dirichlet")


def sum_by_key(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique int64 keys and the int64 sum of `counts` per key."""
    if keys.size == 0:
        return keys.astype(np.int64), counts.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    return k[starts], np.add.reduceat(counts[order].astype(np.int64), starts)


def sum_rows(rows: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows of an int matrix in lexicographic order, with the summed counts of each."""
    if len(rows) == 0:
        return rows.reshape(0, rows.shape[1]).astype(np.int64), counts.astype(np.int64)
    order = np.lexsort(rows.T[::-1])
    r = rows[order]
    starts = np.flatnonzero(np.r_[True, (r[1:] != r[:-1]).any(axis=1)])
    return r[starts].astype(np.int64), np.add.reduceat(counts[order].astype(np.int64), starts)


def sequence_hash(prompt: list[int], answer: list[int]) -> int:
    """A 63-bit hash of one tokenized sample (prompt length and tokens): its identity for leave-one-out."""
    data = np.asarray([len(prompt), *prompt, *answer], dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def event_windows(prompt: list[int], answer: list[int], order: int, vocab: int, include_prompts: bool) -> np.ndarray:
    """[E, order] rows (context..., next token) of one sample's counted events, contexts padded with id V."""
    seq = np.asarray([vocab] * (order - 1) + list(prompt) + list(answer), dtype=np.int64)
    first = 0 if include_prompts else len(prompt)
    n = len(prompt) + len(answer)
    if n <= first:
        return np.zeros((0, order), dtype=np.int64)
    win = np.lib.stride_tricks.sliding_window_view(seq, order)  # row i predicts token i of the sample
    return win[first:n]


def check_tokens(tokens: list[int], vocab: int, what: str) -> None:
    """Refuse token ids outside [0, vocab)."""
    if tokens and (min(tokens) < 0 or max(tokens) >= vocab):
        raise ValueError(f"{what}: token id {max(tokens) if max(tokens) >= vocab else min(tokens)} outside the "
                         f"prior's vocabulary [0, {vocab})")


@dataclass
class OwnCounts:
    """A batch's own events, as lookup tables for leave-one-out: keys are (sequence, row or context) pairs."""

    pair_keys: np.ndarray  # seq * n_next + row of the next-token table
    pair_counts: np.ndarray
    ctx_keys: np.ndarray  # seq * n_ctx + gid
    ctx_counts: np.ndarray  # own events with that context
    ctx_vanish: np.ndarray  # own (context, token) pairs whose whole count is the sequence's own


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[key == query] where present, else 0 (keys sorted)."""
    if keys.size == 0:
        return np.zeros(query.shape, dtype=values.dtype)
    idx = np.searchsorted(keys, query).clip(max=keys.size - 1)
    return np.where(keys[idx] == query, values[idx], 0)


class NGramPrior:
    """The built index: context keys per level, per-context totals and types, next-token counts, sample hashes."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.meta = meta
        self.order = int(meta["order"])
        self.vocab = int(meta["vocab_size"])
        self.smoothing = str(meta["smoothing"])
        self.beta = float(meta["dirichlet_beta"])
        self.root_pseudocount = float(meta["root_pseudocount"])
        self.include_prompts = bool(meta["include_prompts"])
        self.ctx_keys = arrays["ctx_keys"]
        self.level_offsets = arrays["level_offsets"]
        self.next_key = arrays["next_key"]
        self.next_count = arrays["next_count"]
        self.ctx_total = arrays["ctx_total"]
        self.ctx_types = arrays["ctx_types"]
        self.ctx_start = arrays["ctx_start"]
        self.hashes = arrays["hashes"]

    @property
    def n_contexts(self) -> int:
        """Number of contexts (all levels, the empty one included)."""
        return int(self.ctx_total.size)

    @classmethod
    def from_counts(cls, rows: np.ndarray, counts: np.ndarray, hashes: np.ndarray, meta: dict[str, Any]
                    ) -> NGramPrior:
        """Build the trie from unique order-N rows (context..., next) and their counts."""
        order, vocab = int(meta["order"]), int(meta["vocab_size"])
        m = len(rows)
        gid_row = np.zeros(m, dtype=np.int64)
        ctx_keys = [np.zeros(0, dtype=np.int64)]
        offsets = [0, 1]
        next_keys, next_counts = [], []
        nxt = rows[:, order - 1].astype(np.int64) if m else np.zeros(0, dtype=np.int64)
        for level in range(order):
            if level:
                key = gid_row * (vocab + 1) + rows[:, order - 1 - level]
                uniq, inv = np.unique(key, return_inverse=True)
                ctx_keys.append(uniq)
                gid_row = offsets[-1] + inv.reshape(-1)
                offsets.append(offsets[-1] + uniq.size)
            k, c = sum_by_key(gid_row * vocab + nxt, counts)
            next_keys.append(k)
            next_counts.append(c)
        next_key = np.concatenate(next_keys)
        next_count = np.concatenate(next_counts)
        n_ctx = offsets[-1]
        gid = next_key // vocab
        arrays = {
            "ctx_keys": np.concatenate(ctx_keys), "level_offsets": np.asarray(offsets, dtype=np.int64),
            "next_key": next_key, "next_count": next_count,
            "ctx_total": np.bincount(gid, weights=next_count, minlength=n_ctx).astype(np.int64),
            "ctx_types": np.bincount(gid, minlength=n_ctx).astype(np.int64),
            "ctx_start": np.searchsorted(gid, np.arange(n_ctx + 1)).astype(np.int64),
            "hashes": np.sort(hashes.astype(np.int64)),
        }
        return cls(arrays, meta)

    def arrays(self) -> dict[str, np.ndarray]:
        """The index's arrays, for saving."""
        return {"ctx_keys": self.ctx_keys, "level_offsets": self.level_offsets, "next_key": self.next_key,
                "next_count": self.next_count, "ctx_total": self.ctx_total, "ctx_types": self.ctx_types,
                "ctx_start": self.ctx_start, "hashes": self.hashes}

    # ---- lookups -------------------------------------------------------------------------------------------
    def chain(self, contexts: np.ndarray) -> np.ndarray:
        """[P, order] context ids of levels 0..order-1 for [P, order-1] contexts (most recent last); -1: unseen."""
        p = contexts.shape[0]
        out = np.full((p, self.order), -1, dtype=np.int64)
        out[:, 0] = 0
        cur = np.zeros(p, dtype=np.int64)
        ok = np.ones(p, dtype=bool)
        for level in range(1, self.order):
            lo, hi = self.level_offsets[level], self.level_offsets[level + 1]
            keys = self.ctx_keys[lo - 1:hi - 1]  # ctx_keys holds levels >= 1 from gid 1 on
            query = cur * (self.vocab + 1) + contexts[:, self.order - 1 - level]
            if keys.size == 0:
                break
            idx = np.searchsorted(keys, query).clip(max=keys.size - 1)
            ok &= keys[idx] == query
            cur = np.where(ok, lo + idx, 0)
            out[:, level] = np.where(ok, cur, -1)
        return out

    def pair_rows(self, gids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Row of (gid, token) in the next-token table, -1 when absent (gid < 0 or token unseen there)."""
        query = np.where(gids >= 0, gids, 0) * self.vocab + np.where(tokens >= 0, tokens, 0)
        idx = np.searchsorted(self.next_key, query).clip(max=self.next_key.size - 1)
        hit = (self.next_key[idx] == query) & (gids >= 0) & (tokens >= 0)
        return np.where(hit, idx, -1)

    def support(self, gids: np.ndarray, seq: np.ndarray | None = None, own: OwnCounts | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Flat (position, token) pairs of the next tokens seen after each valid gid of [P, L] (ragged gather);
        with `own`, pairs seen only in the position's own sample are left out (they would leak it)."""
        pos = np.broadcast_to(np.arange(gids.shape[0])[:, None], gids.shape).reshape(-1)
        g = gids.reshape(-1)
        keep = g >= 0
        pos, g = pos[keep], g[keep]
        start, stop = self.ctx_start[g], self.ctx_start[g + 1]
        lens = stop - start
        rep = np.repeat(np.arange(g.size), lens)
        within = np.arange(rep.size) - np.repeat(np.cumsum(lens) - lens, lens)
        rows = start[rep] + within
        pos = pos[rep]
        if own is not None and seq is not None:
            left = self.next_count[rows] - _lookup(own.pair_keys, own.pair_counts, seq[pos] * self.next_key.size + rows)
            pos, rows = pos[left > 0], rows[left > 0]
        return pos, self.next_key[rows] % self.vocab

    def member(self, hashes: np.ndarray) -> np.ndarray:
        """Whether each sample hash is in the corpus the prior was built on."""
        idx = np.searchsorted(self.hashes, hashes).clip(max=max(self.hashes.size - 1, 0))
        return (self.hashes.size > 0) & (self.hashes[idx] == hashes)

    def own_counts(self, seq: np.ndarray, windows: np.ndarray) -> OwnCounts:
        """Leave-one-out tables of the events `windows` [E, order] (context..., next) of sequences `seq` [E]."""
        n_next, n_ctx = self.next_key.size, self.n_contexts
        gids = self.chain(windows[:, :-1])
        nxt = np.broadcast_to(windows[:, -1:], gids.shape)
        rows = self.pair_rows(gids, nxt)
        if (rows < 0).any():
            raise ValueError("leave-one-out: a sample said to be in the prior's corpus has events the prior lacks "
                             "(was it tokenized with other options than the prior was built with?)")
        s = np.broadcast_to(seq[:, None], gids.shape).reshape(-1)
        pair_keys, pair_counts = sum_by_key(s * n_next + rows.reshape(-1), np.ones(s.size, np.int64))
        ctx_keys, ctx_counts = sum_by_key(s * n_ctx + gids.reshape(-1), np.ones(s.size, np.int64))
        full = self.next_count[pair_keys % n_next]
        vanish_ctx = (pair_keys // n_next) * n_ctx + self.next_key[pair_keys % n_next] // self.vocab
        vk, vc = sum_by_key(vanish_ctx, (pair_counts == full).astype(np.int64))
        return OwnCounts(pair_keys, pair_counts, ctx_keys, ctx_counts, _lookup(vk, vc, ctx_keys))

    def level_stats(self, gids: np.ndarray, seq: np.ndarray | None, own: OwnCounts | None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, T): events and distinct next tokens per context of [P, L] gids, own events removed; 0 if unseen."""
        g = np.where(gids >= 0, gids, 0)
        n = np.where(gids >= 0, self.ctx_total[g], 0)
        t = np.where(gids >= 0, self.ctx_types[g], 0)
        if own is not None and seq is not None:
            key = seq[:, None] * self.n_contexts + g
            hit = gids >= 0
            n = n - np.where(hit, _lookup(own.ctx_keys, own.ctx_counts, key), 0)
            t = t - np.where(hit, _lookup(own.ctx_keys, own.ctx_vanish, key), 0)
        return n, t

    def pair_counts(self, gids: np.ndarray, tokens: np.ndarray, seq: np.ndarray | None, own: OwnCounts | None
                    ) -> np.ndarray:
        """c(context, token) for gids [P, L] and tokens [P, m] -> [P, L, m], own events removed."""
        g = np.broadcast_to(gids[:, :, None], (*gids.shape, tokens.shape[1]))
        w = np.broadcast_to(tokens[:, None, :], g.shape)
        rows = self.pair_rows(g, w)
        c = np.where(rows >= 0, self.next_count[np.where(rows >= 0, rows, 0)], 0)
        if own is not None and seq is not None:
            key = seq[:, None, None] * self.next_key.size + np.where(rows >= 0, rows, 0)
            c = c - np.where(rows >= 0, _lookup(own.pair_keys, own.pair_counts, key), 0)
        return c

    def probs(self, gids: np.ndarray, tokens: np.ndarray, seq: np.ndarray | None = None,
              own: OwnCounts | None = None, levels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Smoothed p(token | context) over the first `levels` levels of the chain, and the mass Gamma it leaves
        to the root (prob = Gamma * p_root for a token unseen at every level >= 1).

        Root: (c(w) + b / V) / (n + b) with b = root_pseudocount; level L >= 1 with n > 0:
        (c(h, w) + beta(h) p_{L-1}(w)) / (n(h) + beta(h)), beta(h) = T(h) (Witten-Bell) or a constant
        (Dirichlet); a context unseen (n = 0) passes p_{L-1} on unchanged.
        """
        levels = self.order if levels is None else levels
        gids = gids[:, :levels]
        n, t = self.level_stats(gids, seq, own)
        c = self.pair_counts(gids, tokens, seq, own).astype(np.float64)
        b = self.root_pseudocount
        p = (c[:, 0] + b / self.vocab) / (n[:, :1] + b)
        gamma = 1.0 / (n[:, 0] + b)
        for level in range(1, levels):
            nl = n[:, level:level + 1].astype(np.float64)
            beta = t[:, level:level + 1].astype(np.float64) if self.smoothing == "witten_bell" else \
                np.full_like(nl, self.beta)
            seen = nl > 0
            denom = np.where(seen, nl + beta, 1.0)
            p = np.where(seen, (c[:, level] + beta * p) / denom, p)
            gamma = gamma * np.where(seen[:, 0], beta[:, 0] / denom[:, 0], 1.0)
        return p, gamma


def root_weights(prior: NGramPrior) -> np.ndarray:
    """[V] c(w) + b / V: the unnormalised root distribution (the shape of the prior off every context's support)."""
    c = np.zeros(prior.vocab, dtype=np.float64)
    lo, hi = prior.ctx_start[0], prior.ctx_start[1]
    c[prior.next_key[lo:hi] % prior.vocab] = prior.next_count[lo:hi]
    return c + prior.root_pseudocount / prior.vocab
