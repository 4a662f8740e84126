"""The posterior of the teacher's next-token distribution: corpus counts updated with the proxy (ours; see README).

- dirichlet: q(w) = (c(h, w) + kappa * base(w)) / (n(h) + kappa), the posterior mean of a Dirichlet whose
  mean is base = alpha * proxy + (1 - alpha) * prior(w | shorter context) and whose observations are the
  counts c of the longest context h (leave-one-out). kappa -> 0: the counts; kappa -> inf: base.
- product: log q = lambda * log prior + (1 - lambda) * log proxy - log Z, Z over the full vocabulary.
- prior: the smoothed corpus prior alone.

Candidates per position are the proxy's top-k, the unigram's top-k and every token seen after any
non-empty context of the prior's chain (leave-one-out: not those seen only in the sample itself); the stored top-k is taken over them, and each stored log-prob is the exact log q(w)
normalised over the whole vocabulary (the product's mass off the candidates comes from one more fused
`linear_topk` pass with a per-token bias; no logits are materialised).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .ngram import NGramPrior, OwnCounts, event_windows, root_weights, sequence_hash

POSTERIORS = ("dirichlet", "product", "prior")
GATHER_ELEMS = 1 << 23  # most gathered head-row floats per piece of the candidate log-prob pass


@dataclass
class Positions:
    """The answer positions of a batch of examples: contexts, next tokens, sequence ids, own events."""

    contexts: np.ndarray  # [P, order - 1]
    targets: np.ndarray  # [P]
    seq: np.ndarray  # [P] index of the example in the batch
    slot: np.ndarray  # [P] position of the hidden state in the padded row (prompt_len - 1 + j)
    own: OwnCounts | None  # events of the examples found in the prior's corpus (leave-one-out)
    own_tokens: tuple[np.ndarray, np.ndarray]  # (seq, token) distinct own next tokens of member examples
    members: int


def answer_positions(prior: NGramPrior, examples: list[Any], leave_one_out: bool = True) -> Positions:
    """Contexts of every answer token of `examples`, and the own-event tables of those in the corpus."""
    n1, vocab = prior.order - 1, prior.vocab
    ctx, tgt, seq, slot, own_seq, own_win = [], [], [], [], [], []
    members = prior.member(np.asarray([sequence_hash(e.prompt, e.answer) for e in examples], dtype=np.int64)) \
        if leave_one_out else np.zeros(len(examples), dtype=bool)
    for i, e in enumerate(examples):
        win = event_windows(e.prompt, e.answer, prior.order, vocab, False)
        ctx.append(win[:, :n1])
        tgt.append(win[:, n1])
        seq.append(np.full(len(win), i, dtype=np.int64))
        slot.append(len(e.prompt) - 1 + np.arange(len(win)))
        if members[i]:
            own = event_windows(e.prompt, e.answer, prior.order, vocab, prior.include_prompts)
            own_win.append(own)
            own_seq.append(np.full(len(own), i, dtype=np.int64))

    def cat(xs: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(xs) if xs else np.zeros(shape, dtype=np.int64)

    own_tables, own_tokens = None, (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if own_win:
        ow, os_ = np.concatenate(own_win), np.concatenate(own_seq)
        own_tables = prior.own_counts(os_, ow)
        key = np.unique(os_ * vocab + ow[:, -1])
        own_tokens = (key // vocab, key % vocab)
    return Positions(cat(ctx, (0, n1)), cat(tgt, (0,)), cat(seq, (0,)), cat(slot, (0,)), own_tables, own_tokens,
                     int(members.sum()))


def union_columns(n_pos: int, sources: list[tuple[np.ndarray, np.ndarray, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Padded [P, m] distinct token columns per position (-1 filler) and whether each may enter the top-k."""
    pos = np.concatenate([s[0] for s in sources])
    tok = np.concatenate([s[1] for s in sources])
    sel = np.concatenate([np.full(s[0].size, s[2]) for s in sources])
    big = int(tok.max()) + 1 if tok.size else 1
    key = pos * big + tok
    order = np.lexsort((~sel, key))  # per key, a selectable copy first
    key, sel = key[order], sel[order]
    first = np.r_[True, key[1:] != key[:-1]]
    key, sel = key[first], sel[first]
    p, t = key // big, key % big
    counts = np.bincount(p, minlength=n_pos)
    width = max(int(counts.max()) if counts.size else 1, 1)
    slot = np.arange(p.size) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = np.full((n_pos, width), -1, dtype=np.int64)
    selectable = np.zeros((n_pos, width), dtype=bool)
    cols[p, slot] = t
    selectable[p, slot] = sel
    return cols, selectable


def gather_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, cols: Tensor) -> Tensor:
    """z[p, j] = hidden[p] . weight[cols[p, j]] (+ bias), fp32, in pieces bounded by GATHER_ELEMS; cols >= 0."""
    out = torch.empty(cols.shape, dtype=torch.float32, device=hidden.device)
    step = max(1, GATHER_ELEMS // max(1, cols.shape[1] * hidden.shape[1]))
    for s in range(0, cols.shape[0], step):
        c = cols[s:s + step]
        rows = weight[c].float()  # [p, m, H]
        z = torch.bmm(rows, hidden[s:s + step].float().unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            z = z + bias[c].float()
        out[s:s + step] = z
    return out


class Posterior:
    """Posterior targets for one prior and one setting (kind, strength kappa or lambda, mix alpha)."""

    def __init__(self, prior: NGramPrior, kind: str, strength: float | None, mix: float | None, head_vocab: int
                 ) -> None:
        if kind not in POSTERIORS:
            raise ValueError(f"posterior must be one of {', '.join(POSTERIORS)}; got {kind!r}")
        self.prior, self.kind, self.strength, self.mix = prior, kind, strength, mix
        self.head_vocab = head_vocab
        root = root_weights(prior)
        self.log_root = np.full(head_vocab, -np.inf)
        self.log_root[: prior.vocab] = np.log(root)
        self.root_top = np.argsort(-root, kind="stable")[:64]  # the unigram's best tokens are always candidates

    # ---- the per-position terms ------------------------------------------------------------------------
    def columns(self, pos: Positions, gids: np.ndarray, proxy_ids: np.ndarray, with_target: bool
                ) -> tuple[np.ndarray, np.ndarray]:
        """Candidate columns: proxy top-k and the chain's supports (selectable), own tokens and y (not)."""
        n = len(pos.seq)
        k = proxy_ids.shape[1]
        sources = [(np.repeat(np.arange(n), k), proxy_ids.reshape(-1), True)]
        top_root = self.root_top[:k]
        sources.append((np.repeat(np.arange(n), top_root.size), np.tile(top_root, n), True))
        if self.prior.order > 1:
            sp, st = self.prior.support(gids[:, 1:], pos.seq, pos.own)
            sources.append((sp, st, True))
        if self.kind == "product" and pos.own_tokens[0].size:  # the root's own counts differ: sum them exactly
            oseq, otok = pos.own_tokens
            nseq = int(max(pos.seq.max() if n else 0, oseq.max())) + 1
            starts = np.searchsorted(pos.seq, np.arange(nseq + 1))
            lens = starts[oseq + 1] - starts[oseq]
            rep = np.repeat(np.arange(oseq.size), lens)
            within = np.arange(rep.size) - np.repeat(np.cumsum(lens) - lens, lens)
            sources.append((starts[oseq][rep] + within, otok[rep], False))
        if with_target:
            sources.append((np.arange(n), pos.targets, False))
        return union_columns(n, sources)

    def prior_terms(self, pos: Positions, gids: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
        """Full prior, its root mass Gamma, and the top level's counts / total and the shorter-context prior."""
        pr, n1 = self.prior, self.prior.order - 1
        safe = np.where(cols >= 0, cols, 0)
        full, gamma = pr.probs(gids, safe, pos.seq, pos.own)
        top = gids[:, n1:]
        c_top = pr.pair_counts(top, safe, pos.seq, pos.own)[:, 0].astype(np.float64)
        n_top = pr.level_stats(top, pos.seq, pos.own)[0][:, 0].astype(np.float64)
        lower = pr.probs(gids, safe, pos.seq, pos.own, levels=n1)[0] if n1 else np.full(cols.shape, 1.0 / pr.vocab)
        outside = cols >= pr.vocab
        for a in (full, c_top, lower):
            a[outside] = 0.0
        return {"full": full, "gamma": gamma, "c_top": c_top, "n_top": n_top, "lower": lower}

    def proxy_terms(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, cols: np.ndarray,
                    top_ids: Tensor, top_lps: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """log p_proxy at the columns (fp64, -inf on fillers) and the proxy's log-sum-exp per position."""
        c = torch.from_numpy(np.where(cols >= 0, cols, 0)).to(hidden.device)
        z = gather_logits(hidden, weight, bias, c).double()
        z1 = gather_logits(hidden, weight, bias, top_ids[:, :1]).double()[:, 0]
        lse = z1 - top_lps[:, 0].double()
        lp = (z - lse[:, None]).cpu().numpy()
        lp[cols < 0] = -np.inf
        return lp, lse.cpu().numpy()

    def remainder(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, lam: float, lse: np.ndarray,
                  chunk_size: int | None, backend: str) -> np.ndarray:
        """sum_w root(w)^lam * p_proxy(w)^(1 - lam) over the whole vocabulary, one fused top-1 pass (0 < lam < 1)."""
        from proxykd_fast.losses import linear_topk

        shift = torch.from_numpy(np.maximum(self.log_root, -700.0) * (lam / (1 - lam))).to(hidden.device)
        b2 = shift.float() if bias is None else bias.float() + shift.float()
        temp = 1.0 / (1.0 - lam)
        ids, lps = linear_topk(hidden.float(), weight.float(), 1, bias=b2, temperature=temp, chunk_size=chunk_size,
                               backend=backend)
        z = gather_logits(hidden, weight, b2, ids).double()[:, 0]
        lse2 = z / temp - lps[:, 0].double()
        return np.exp(lse2.cpu().numpy() - (1 - lam) * lse)

    def log_q(self, terms: dict[str, np.ndarray], lp: np.ndarray, cols: np.ndarray, strength: float,
              mix: float | None, rem: np.ndarray | None) -> np.ndarray:
        """log q at the columns (-inf on fillers) for one strength (and mix)."""
        with np.errstate(divide="ignore"):
            if self.kind == "prior":
                out = np.log(terms["full"])
            elif self.kind == "dirichlet":
                base = mix * np.exp(lp) + (1 - mix) * terms["lower"]
                out = np.log(terms["c_top"] + strength * base) - np.log(terms["n_top"] + strength)[:, None]
            else:
                out = self.product_log_q(terms, lp, cols, strength, rem)
        out[cols < 0] = -np.inf
        return out

    def product_log_q(self, terms: dict[str, np.ndarray], lp: np.ndarray, cols: np.ndarray, lam: float,
                      rem: np.ndarray | None) -> np.ndarray:
        """lambda log prior + (1 - lambda) log proxy - log Z over the full vocabulary."""
        lprior = np.log(terms["full"])
        if lam >= 1.0:
            return lprior
        if lam <= 0.0:
            return lp.copy()
        valid = cols >= 0
        s = np.where(valid, lam * lprior + (1 - lam) * lp, -np.inf)
        log_root_c = np.where(valid, self.log_root[np.where(valid, cols, 0)], -np.inf)
        off = np.where(valid, np.exp(lam * log_root_c + (1 - lam) * lp), 0.0).sum(1)
        rest = np.maximum(rem - off, 0.0) * terms["gamma"] ** lam
        z = np.logaddexp(np.logaddexp.reduce(s, axis=1), np.log(np.maximum(rest, 1e-300)))
        return s - z[:, None]


def topk_columns(logq: np.ndarray, cols: np.ndarray, selectable: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best selectable columns per position: ids [P, k] and their log q (fp32)."""
    score = np.where(selectable & (cols >= 0), logq, -np.inf)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(cols, order, 1)
    lq = np.take_along_axis(score, order, 1)
    return ids, lq.astype(np.float32)
