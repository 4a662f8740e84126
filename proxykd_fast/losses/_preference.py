"""Sequence-level losses (DPO) on the chunk engine: tokens laid out pair by pair, chunked by tokens.

The non-ignored tokens are laid out pair by pair (chosen row, then rejected row) and cut into
chunks of at most `rows` tokens. Pairs that fit are packed whole into a chunk, so their sequence
log-probs, and hence d loss / d logits, are known after the chunk's one logits GEMM: logits ->
log-probs -> dlogits in place -> dX, dW GEMMs. A pair longer than a chunk is streamed: a
forward-only pass gets its sequence log-probs, then a second pass recomputes each chunk with
the now-known coefficients. Peak memory is one [rows, V] buffer plus dW, whatever T is.
The loss itself is an `Objective` of the per-row token log-prob sums (dpo.py defines it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from . import _engine
from ._gemm import param_grad
from ._spec import Head, accumulation_dtype, first_order_only
from ._vocab_parallel import VocabShard


class TokenRows(Protocol):
    """The two per-chunk steps of a sequence-level loss."""

    def logps(self, S: Tensor, labels: Tensor) -> Tensor:
        """log softmax(S)[y] per row (may transform S for `dlogits`)."""

    def dlogits(self, S: Tensor, labels: Tensor, coef: Tensor) -> None:
        """Overwrite S with coef * (onehot(y) - softmax) after `logps` ran on it."""


class Objective(Protocol):
    """A loss of the per-row token log-prob sums whose pairs are separable."""

    def total(self, sums: Tensor) -> Tensor:
        """The loss from all row sums (fp64)."""

    def row_coefficients(self, sums: Tensor, p0: int, p1: int, out: Tensor) -> None:
        """Write d loss / d sums for the rows of pairs p0..p1-1 into `out` [2B]."""


@dataclass(frozen=True)
class PairPlan:
    """Non-ignored tokens laid out pair by pair and their chunks (meta: pair start, stop, streamed)."""

    idx: Tensor  # [M] int64 flat token positions in [2B*T]
    labels: Tensor  # [M] int64
    row: Tensor  # [M] int64 sequence row in [0, 2B)
    counts: Tensor  # [2B] int64 tokens per row
    chunks: list[_engine.Chunk]


def plan_pairs(flat_labels: Tensor, lead: tuple[int, int], ignore_index: int, rows: int) -> PairPlan:
    """Order the non-ignored tokens pair-major and cut them into chunks of whole pairs (or stream a long pair)."""
    n_rows, t = lead
    b = n_rows // 2
    valid = (flat_labels != ignore_index).view(n_rows, t)
    order = torch.arange(n_rows, device=valid.device).view(2, b).t().reshape(-1)  # 0, B, 1, B+1, ...
    nz = valid.index_select(0, order).nonzero()
    row = order.index_select(0, nz[:, 0])
    idx = row * t + nz[:, 1]
    counts = valid.sum(1)
    spans: list[tuple[int, int, int, int, bool]] = []
    pair_tokens = (counts[:b] + counts[b:]).tolist()
    tok = start_tok = start_pair = 0
    for p, n in enumerate(pair_tokens):
        if n > rows:  # stream this pair in token chunks; flush the packed chunk before it
            if tok > start_tok:
                spans.append((start_tok, tok, start_pair, p, False))
            spans.extend((s, min(s + rows, tok + n), p, p + 1, True) for s in range(tok, tok + n, rows))
            tok += n
            start_tok, start_pair = tok, p + 1
            continue
        if tok + n - start_tok > rows:
            spans.append((start_tok, tok, start_pair, p, False))
            start_tok, start_pair = tok, p
        tok += n
    if start_pair < b and tok > start_tok:
        spans.append((start_tok, tok, start_pair, b, False))
    chunks = [_engine.Chunk(s0, s1, idx[s0:s1], (p0, p1, streamed)) for s0, s1, p0, p1, streamed in spans]
    return PairPlan(idx, flat_labels.index_select(0, idx), row, counts, chunks)


class _TokenPass:
    """The engine's per-chunk step: token log-probs into row sums and, with an objective, dlogits."""

    def __init__(self, plan: PairPlan, ops: TokenRows, sums: Tensor, coef: Tensor, obj: Objective | None,
                 need_grad: bool) -> None:
        self.plan, self.ops, self.sums, self.coef, self.obj, self.need_grad = plan, ops, sums, coef, obj, need_grad

    def __call__(self, chunk: _engine.Chunk, S: Tensor, P: Tensor | None, R: Tensor | None) -> bool:
        p0, p1, streamed = chunk.meta
        y = self.plan.labels[chunk.start : chunk.stop]
        r = self.plan.row[chunk.start : chunk.stop]
        lp = self.ops.logps(S, y)
        if streamed and not self.need_grad:  # forward only: just the sums
            self.sums.index_add_(0, r, lp.double())
            return False
        if not streamed:
            self.sums.index_add_(0, r, lp.double())
            if not self.need_grad:
                return False
            self.obj.row_coefficients(self.sums, p0, p1, self.coef)
        # d loss / d logits = c_row * (onehot(y) - softmax(z)), c_row = d loss / d (row sum)
        self.ops.dlogits(S, y, self.coef.index_select(0, r).to(S.dtype))
        return True


def token_pass(head: Head, plan: PairPlan, ops: TokenRows, obj: Objective | None, grad_hidden: bool,
               grad_weight: bool, grad_bias: bool, shard: VocabShard | None = None) -> tuple[Tensor, _engine.Gradients]:
    """Row log-prob sums [2B] (fp64) and, if asked, dX, dW (fp32/fp64), db of the objective, chunk by chunk.

    Without gradients (`obj` may then be None) every chunk is computed once.
    """
    device = head.hidden.device
    acc = accumulation_dtype(head.hidden, head.weight)
    need_grad = grad_hidden or grad_weight or grad_bias
    n_rows = plan.counts.shape[0]
    sums = torch.zeros(n_rows, dtype=torch.float64, device=device)
    coef = torch.zeros(n_rows, dtype=torch.float64, device=device)
    streamed = [c for c in plan.chunks if c.meta[2]]
    if need_grad and streamed:  # forward-only pass over the long pairs: their coefficients need every token
        _engine.run(streamed, head, _TokenPass(plan, ops, sums, coef, None, False), acc_dtype=acc)
        for p in sorted({c.meta[0] for c in streamed}):
            obj.row_coefficients(sums, p, p + 1, coef)
    grads = _engine.run(plan.chunks, head, _TokenPass(plan, ops, sums, coef, obj, need_grad), acc_dtype=acc,
                        grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias, shard=shard)
    return sums, grads


class FusedSequenceLoss(torch.autograd.Function):
    """Loss and row log-prob sums; gradients are computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan, ops, obj, out_dtype, shard):
        gh, gw, gb = ctx.needs_input_grad[:3]
        sums, grads = token_pass(Head(hidden, weight, bias), plan, ops, obj, gh, gw, gb, shard)
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(sums)
        return obj.total(sums).to(out_dtype), sums

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, _grad_sums):
        dh, dw, db = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (param_grad(dh, grad_loss), param_grad(dw, grad_loss, w_dtype), param_grad(db, grad_loss, b_dtype),
                None, None, None, None, None)


def sequence_loss(head: Head, plan: PairPlan, ops: TokenRows, obj: Objective, out_dtype: torch.dtype,
                  shard: VocabShard | None = None) -> tuple[Tensor, Tensor]:
    """(loss, row sums) of `obj` on the token-chunked plan; a graph only where an input needs a gradient."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (head.hidden, head.weight, head.bias)):
        return FusedSequenceLoss.apply(head.hidden, head.weight, head.bias, plan, ops, obj, out_dtype, shard)
    sums, _ = token_pass(head, plan, ops, obj, False, False, False, shard)  # no graph: skip the gradient work
    return obj.total(sums).to(out_dtype), sums
