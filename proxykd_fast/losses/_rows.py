"""Row losses on the chunk engine: NLL (+ KD), cross-entropy, per-token log-probs and top-k.

Each row (token) is independent, so the plan is chunks of the non-ignored rows and the chunk
epilogue is a row epilogue (torch, Triton or CUDA: one `RowEpilogue` contract). With a scalar
upstream gradient (reduction mean/sum) the gradient is computed in the forward and the backward
only rescales it; with per-row outputs the backward recomputes the chunks with the per-row
upstream gradients.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import torch
from torch import Tensor

from . import _engine
from ._gemm import default_chunk_rows, param_grad
from ._spec import EpilogueArgs, Head, KDBatch, LossSpec, accumulation_dtype, first_order_only
from ._vocab_parallel import VocabShard


class RowEpilogue(Protocol):
    """Turns a chunk's logits into per-row NLL and divergence, and dlogits in place (EpilogueArgs)."""

    def buffers(self, spec: LossSpec, online: bool, dtype: torch.dtype) -> int:
        """How many [C, V] buffers it needs: S, then P when online, then scratch R."""

    def __call__(self, args: EpilogueArgs, spec: LossSpec) -> tuple[Tensor, Tensor | None]:
        """(nll [C], kd [C] or None); with args.need_grad, dlogits are left in args.S."""


class _RowLosses:
    """The engine's per-chunk step for NLL (+ KD): coefficients, the row epilogue, row outputs."""

    def __init__(self, batch: KDBatch, spec: LossSpec, epilogue: RowEpilogue, row_grad: Tensor | float | None,
                 need_grad: bool, acc_dtype: torch.dtype) -> None:
        n, device = batch.labels.shape[0], batch.labels.device
        self.batch, self.spec, self.epilogue = batch, spec, epilogue
        self.row_grad, self.need_grad, self.acc = row_grad, need_grad, acc_dtype
        self.row_loss = torch.zeros(n, device=device, dtype=acc_dtype)
        self.nll_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.kd_sum = torch.zeros((), device=device, dtype=torch.float64)

    def __call__(self, chunk: _engine.Chunk, S: Tensor, P: Tensor | None, R: Tensor | None) -> bool:
        batch, spec, acc = self.batch, self.spec, self.acc
        y = chunk.take(batch.labels)
        valid = y != spec.ignore_index
        y_safe = torch.where(valid, y, torch.zeros_like(y))
        validf = valid.to(acc)
        scalar_grad = not isinstance(self.row_grad, Tensor)
        g = validf * (self.row_grad if scalar_grad and self.row_grad is not None else 1.0)
        if not scalar_grad:
            g = g * chunk.take(self.row_grad).to(acc)
        kd_scale = validf * spec.alpha
        if batch.row_weight is not None:
            kd_scale = kd_scale * chunk.take(batch.row_weight).to(acc)
        ids = lps = None
        if batch.topk_ids is not None:
            ids, lps = chunk.take(batch.topk_ids), chunk.take(batch.topk_logprobs).to(acc)
        c_nll = g if spec.nll_weight == 1.0 else g * spec.nll_weight
        args = EpilogueArgs(S, P, R, y_safe, ids, lps, c_nll, g * kd_scale, self.need_grad)
        nll, kd = self.epilogue(args, spec)
        nll = nll * validf
        loss = nll if spec.nll_weight == 1.0 else nll * spec.nll_weight
        self.nll_sum += nll.sum(dtype=torch.float64)
        if kd is not None:
            kd = kd * validf
            self.kd_sum += kd.sum(dtype=torch.float64)
            loss = loss + kd_scale * kd
        if chunk.rows is None:
            self.row_loss[chunk.start : chunk.stop] = loss
        else:
            self.row_loss.index_copy_(0, chunk.rows, loss.to(acc))
        return self.need_grad


def run_rows(batch: KDBatch, spec: LossSpec, epilogue: RowEpilogue, row_grad: Tensor | float | None, *,
             grad_hidden: bool, grad_weight: bool, grad_bias: bool) -> tuple[_RowLosses, _engine.Gradients]:
    """One engine pass over the non-ignored rows: row losses, and gradients scaled by `row_grad`."""
    s, p = batch.student, batch.proxy
    acc = accumulation_dtype(s.hidden, s.weight, *((p.hidden, p.weight) if p is not None else ()))
    need_grad = row_grad is not None and (grad_hidden or grad_weight or grad_bias)
    nbuf = epilogue.buffers(spec, p is not None, acc)
    # Ignored rows (prompts, padding) cost no GEMM: chunks are cut over the valid rows only.
    order = _engine.kept_rows(batch.labels != spec.ignore_index)
    n = batch.labels.shape[0]
    m = n if order is None else order.numel()
    rows = spec.chunk_size or default_chunk_rows(s.hidden.device, nbuf, s.vocab, m)
    step = _RowLosses(batch, spec, epilogue, row_grad, need_grad, acc)
    grads = _engine.run(_engine.row_chunks(n, rows, order), s, step, acc_dtype=acc, nbuf=nbuf, proxy=p,
                        grad_hidden=need_grad and grad_hidden, grad_weight=need_grad and grad_weight,
                        grad_bias=need_grad and grad_bias, shard=spec.shard)
    return step, grads


def _saved(batch: KDBatch) -> tuple[Tensor | None, ...]:
    """The batch's tensors in save_for_backward order."""
    s, p = batch.student, batch.proxy
    proxy = (p.hidden, p.weight, p.bias) if p is not None else (None, None, None)
    return (s.hidden, s.weight, s.bias, batch.labels, *proxy, batch.topk_ids, batch.topk_logprobs, batch.row_weight)


def _restored(saved: tuple[Tensor | None, ...], template: KDBatch) -> KDBatch:
    """The batch rebuilt from its saved tensors."""
    hs, ws, bs, labels, hp, wp, bp, ids, lps, row_weight = saved
    return replace(template, student=Head(hs, ws, bs), labels=labels, proxy=None if wp is None else Head(hp, wp, bp),
                   topk_ids=ids, topk_logprobs=lps, row_weight=row_weight)


class FusedRowLoss(torch.autograd.Function):
    """Autograd wrapper: returns (loss, nll_sum, kd_sum); only `loss` is differentiable."""

    @staticmethod
    def forward(ctx, hs, ws, bs, batch, spec, epilogue):
        batch = replace(batch, student=Head(hs, ws, bs))
        gh, gw, gb = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ctx.spec, ctx.epilogue, ctx.template = spec, epilogue, batch
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        if spec.reduction == "none":
            res, _ = run_rows(batch, spec, epilogue, None, grad_hidden=False, grad_weight=False, grad_bias=False)
            ctx.save_for_backward(*_saved(batch))
            ctx.mark_non_differentiable(res.nll_sum, res.kd_sum)
            return res.row_loss, res.nll_sum, res.kd_sum
        scale = 1.0 / spec.denominator
        res, grads = run_rows(batch, spec, epilogue, scale, grad_hidden=gh, grad_weight=gw, grad_bias=gb)
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        ctx.mark_non_differentiable(res.nll_sum, res.kd_sum)
        loss = (res.row_loss.sum(dtype=torch.float64) * scale).to(res.row_loss.dtype)
        return loss, res.nll_sum, res.kd_sum

    @staticmethod
    @first_order_only  # the gradient is computed by the engine, not by autograd
    def backward(ctx, grad_loss, _g_nll, _g_kd):
        _, w_dtype, b_dtype = ctx.dtypes
        if ctx.spec.reduction != "none":
            dh, dw, db = ctx.saved_tensors
            return (param_grad(dh, grad_loss), param_grad(dw, grad_loss, w_dtype), param_grad(db, grad_loss, b_dtype),
                    None, None, None)
        batch = _restored(ctx.saved_tensors, ctx.template)
        gh, gw, gb = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        _, grads = run_rows(batch, ctx.spec, ctx.epilogue, grad_loss.reshape(-1), grad_hidden=gh, grad_weight=gw,
                            grad_bias=gb)
        dw, db = param_grad(grads.weight, dtype=w_dtype), param_grad(grads.bias, dtype=b_dtype)
        return grads.hidden, dw, db, None, None, None


def fused_kd(batch: KDBatch, spec: LossSpec, epilogue: RowEpilogue) -> tuple[Tensor, Tensor, Tensor]:
    """The fused NLL (+ KD) of a validated batch on the chunk engine; returns (loss, nll_sum, kd_sum)."""
    s = batch.student
    if not torch.is_grad_enabled():  # autograd.Function still reports needs_input_grad under no_grad
        s = s.detached()
    return FusedRowLoss.apply(s.hidden, s.weight, s.bias, batch, spec, epilogue)


def fused_log_probs(head: Head, labels: Tensor, temperature: float, ignore_index: int, chunk_size: int | None,
                    epilogue: RowEpilogue, shard: VocabShard | None = None) -> Tensor:
    """Per-token log softmax(z/T)[label], 0 on ignored rows: minus the per-row CE of z/T, differentiable."""
    spec = LossSpec(ignore_index=ignore_index, reduction="none", chunk_size=chunk_size, logit_scale=1.0 / temperature,
                    shard=shard)
    rows, _, _ = FusedRowLoss.apply(head.hidden, head.weight, head.bias, KDBatch(head, labels), spec, epilogue)
    return -rows


class _LogProbsEntropy:
    """The engine's per-chunk step of per-token log-probs and entropy of softmax(scale * z), and their dlogits.

    Buffers: S (logits, then log q, then dlogits) and R (q). With upstream gradients g_lp, g_h:
    d/dz = scale * (g_lp (onehot(y) - q) - g_h q (log q + H)).
    """

    def __init__(self, labels: Tensor, scale: float, ignore_index: int, grads: tuple[Tensor, Tensor] | None,
                 acc: torch.dtype, shard: VocabShard | None) -> None:
        from ._epilogue_torch import Vocab

        n, device = labels.shape[0], labels.device
        self.labels, self.scale, self.ignore_index, self.grads = labels, scale, ignore_index, grads
        self.vocab = Vocab(shard)
        self.logp = torch.zeros(n, device=device, dtype=acc)
        self.entropy = torch.zeros(n, device=device, dtype=acc)

    def __call__(self, chunk: _engine.Chunk, S: Tensor, P: Tensor | None, R: Tensor | None) -> bool:
        from ._epilogue_torch import zero_where_zero

        y = chunk.take(self.labels)
        if self.scale != 1.0:
            S.mul_(self.scale)
        self.vocab.log_softmax_(S)  # log q
        lp = self.vocab.pick(S, y[:, None]).view(-1)
        torch.exp(S, out=R)  # q
        h = -self.vocab.dot(R, S)
        rows = chunk.rows if chunk.rows is not None else slice(chunk.start, chunk.stop)
        self.logp[rows] = lp
        self.entropy[rows] = h
        if self.grads is None:
            return False
        g_lp, g_h = (chunk.take(g).to(S.dtype) for g in self.grads)
        S.add_(h[:, None]).mul_(g_h[:, None]).add_(g_lp[:, None])  # g_lp + g_h (log q + H)
        zero_where_zero(S.mul_(R), R).mul_(-self.scale)
        self.vocab.scatter_add_(S, y[:, None], (g_lp * self.scale)[:, None])
        return True


def _log_probs_entropy_pass(head: Head, labels: Tensor, temperature: float, ignore_index: int,
                            chunk_size: int | None, shard: VocabShard | None, grads: tuple[Tensor, Tensor] | None,
                            need: tuple[bool, bool, bool]) -> tuple[_LogProbsEntropy, _engine.Gradients]:
    """One engine pass over the non-ignored rows (two [C, V] buffers per chunk)."""
    acc = accumulation_dtype(head.hidden, head.weight)
    order = _engine.kept_rows(labels != ignore_index)
    n = labels.shape[0]
    m = n if order is None else order.numel()
    rows = chunk_size or default_chunk_rows(head.hidden.device, 2, head.vocab, m)
    step = _LogProbsEntropy(labels, 1.0 / temperature, ignore_index, grads, acc, shard)
    with_grad = grads is not None
    out = _engine.run(_engine.row_chunks(n, rows, order), head, step, acc_dtype=acc, nbuf=2,
                      grad_hidden=with_grad and need[0], grad_weight=with_grad and need[1],
                      grad_bias=with_grad and need[2], shard=shard)
    return step, out


class FusedLogProbsEntropy(torch.autograd.Function):
    """Per-token (log-prob, entropy), both differentiable; the backward recomputes the chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, chunk_size, shard):
        step, _ = _log_probs_entropy_pass(Head(hidden, weight, bias), labels, temperature, ignore_index, chunk_size,
                                          shard, None, (False, False, False))
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.args = (temperature, ignore_index, chunk_size, shard)
        return step.logp, step.entropy

    @staticmethod
    @first_order_only
    def backward(ctx, g_lp, g_h):
        hidden, weight, bias, labels = ctx.saved_tensors
        _, grads = _log_probs_entropy_pass(Head(hidden, weight, bias), labels, *ctx.args, (g_lp, g_h),
                                           tuple(ctx.needs_input_grad[:3]))
        dw = param_grad(grads.weight, dtype=weight.dtype)
        db = None if bias is None else param_grad(grads.bias, dtype=bias.dtype)
        return grads.hidden, dw, db, None, None, None, None, None


class _TopK:
    """The engine's per-chunk step of the streaming top-k: log-softmax statistics and torch.topk.

    Vocab-parallel: each rank ranks its own columns, the candidates (with global ids) are
    all-gathered and merged, and the row's log-sum-exp is all-reduced.
    """

    def __init__(self, n: int, k: int, temperature: float, device: torch.device, shard: VocabShard | None) -> None:
        self.k, self.temperature, self.shard = k, temperature, shard
        self.ids = torch.empty(n, k, device=device, dtype=torch.int64)
        self.lps = torch.empty(n, k, device=device, dtype=torch.float32)

    def __call__(self, chunk: _engine.Chunk, S: Tensor, P: Tensor | None, R: Tensor | None) -> bool:
        if self.temperature != 1.0:
            S.mul_(1.0 / self.temperature)
        if self.shard is None:
            lse = torch.logsumexp(S, 1, keepdim=True)
            vals, idx = torch.topk(S, self.k, dim=1)
        else:
            vals, idx = self._merged(S)
            lse = self._lse(S)
        self.ids[chunk.start : chunk.stop] = idx
        self.lps[chunk.start : chunk.stop] = (vals - lse).float()
        return False

    def _merged(self, S: Tensor) -> tuple[Tensor, Tensor]:
        """The global top-k of the row from every rank's local top-min(k, V_r) (ids global)."""
        shard, c = self.shard, S.shape[0]
        kl = min(self.k, S.shape[1])
        vals = torch.full((c, self.k), -float("inf"), dtype=S.dtype, device=S.device)
        ids = torch.full((c, self.k), -1, dtype=torch.int64, device=S.device)
        v, i = torch.topk(S, kl, dim=1)
        vals[:, :kl], ids[:, :kl] = v, i + shard.offset
        cand_v, cand_i = torch.cat(shard.all_gather(vals), 1), torch.cat(shard.all_gather(ids), 1)
        # padding slots (id -1) rank below every real column, -inf logits included
        rank = torch.where(cand_i >= 0, torch.where(cand_v.isneginf(), torch.finfo(cand_v.dtype).min, cand_v),
                           -float("inf"))
        _, pos = torch.topk(rank, self.k, dim=1, sorted=True)
        return cand_v.gather(1, pos), cand_i.gather(1, pos)

    def _lse(self, S: Tensor) -> Tensor:
        """Row log-sum-exp over the full vocabulary, [C, 1]."""
        from ._epilogue_torch import row_sumexp

        m = self.shard.max_(S.max(1).values)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = self.shard.sum_(row_sumexp(S - m[:, None]))
        return (m + s.log())[:, None]


@torch.no_grad()
def chunked_topk(head: Head, k: int, temperature: float, chunk_size: int | None,
                 shard: VocabShard | None = None) -> tuple[Tensor, Tensor]:
    """Top-k token ids and their log-probs under softmax(z/T) over the full vocabulary, chunk by chunk."""
    n, device = head.hidden.shape[0], head.hidden.device
    acc = accumulation_dtype(head.hidden, head.weight)
    step = _TopK(n, k, temperature, device, shard)
    rows = chunk_size or default_chunk_rows(device, 1, head.vocab, n)
    _engine.run(_engine.row_chunks(n, rows), head, step, acc_dtype=acc)
    return step.ids, step.lps
