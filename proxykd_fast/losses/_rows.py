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
from ._gemm import default_chunk_rows
from ._spec import EpilogueArgs, Head, KDBatch, LossSpec, accumulation_dtype


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
        args = EpilogueArgs(S, P, R, y_safe, ids, lps, g, g * kd_scale, self.need_grad)
        nll, kd = self.epilogue(args, spec)
        nll = nll * validf
        loss = nll
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
                        grad_bias=need_grad and grad_bias)
    return step, grads


def _scale(t: Tensor | None, s: Tensor, dtype: torch.dtype | None = None) -> Tensor | None:
    """Multiply a saved gradient by the upstream scalar (skipped when it is exactly 1)."""
    if t is None:
        return None
    if not (s.numel() == 1 and float(s) == 1.0):
        t = t * s.to(t.dtype)
    return t if dtype is None else t.to(dtype)


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
    def forward(ctx, hs, ws, bs, batch, spec, epilogue):  # noqa: ANN001, ANN205, D102
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
    def backward(ctx, grad_loss, _g_nll, _g_kd):  # noqa: ANN001, ANN205, D102
        _, w_dtype, b_dtype = ctx.dtypes
        if ctx.spec.reduction != "none":
            dh, dw, db = ctx.saved_tensors
            return _scale(dh, grad_loss), _scale(dw, grad_loss, w_dtype), _scale(db, grad_loss, b_dtype), None, None, None
        batch = _restored(ctx.saved_tensors, ctx.template)
        gh, gw, gb = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        _, grads = run_rows(batch, ctx.spec, ctx.epilogue, grad_loss.reshape(-1), grad_hidden=gh, grad_weight=gw,
                            grad_bias=gb)
        dw = None if grads.weight is None else grads.weight.to(w_dtype)
        db = None if grads.bias is None else grads.bias.to(b_dtype)
        return grads.hidden, dw, db, None, None, None


def fused_kd(batch: KDBatch, spec: LossSpec, epilogue: RowEpilogue) -> tuple[Tensor, Tensor, Tensor]:
    """The fused NLL (+ KD) of a validated batch on the chunk engine; returns (loss, nll_sum, kd_sum)."""
    s = batch.student
    if not torch.is_grad_enabled():  # autograd.Function still reports needs_input_grad under no_grad
        s = s.detached()
    return FusedRowLoss.apply(s.hidden, s.weight, s.bias, batch, spec, epilogue)


def fused_log_probs(head: Head, labels: Tensor, temperature: float, ignore_index: int, chunk_size: int | None,
                    epilogue: RowEpilogue) -> Tensor:
    """Per-token log softmax(z/T)[label], 0 on ignored rows: minus the per-row CE of z/T, differentiable."""
    spec = LossSpec(ignore_index=ignore_index, reduction="none", chunk_size=chunk_size, logit_scale=1.0 / temperature)
    rows, _, _ = FusedRowLoss.apply(head.hidden, head.weight, head.bias, KDBatch(head, labels), spec, epilogue)
    return -rows


class _TopK:
    """The engine's per-chunk step of the streaming top-k: log-softmax statistics and torch.topk."""

    def __init__(self, n: int, k: int, temperature: float, device: torch.device) -> None:
        self.k, self.temperature = k, temperature
        self.ids = torch.empty(n, k, device=device, dtype=torch.int64)
        self.lps = torch.empty(n, k, device=device, dtype=torch.float32)

    def __call__(self, chunk: _engine.Chunk, S: Tensor, P: Tensor | None, R: Tensor | None) -> bool:
        if self.temperature != 1.0:
            S.mul_(1.0 / self.temperature)
        lse = torch.logsumexp(S, 1, keepdim=True)
        vals, idx = torch.topk(S, self.k, dim=1)
        self.ids[chunk.start : chunk.stop] = idx
        self.lps[chunk.start : chunk.stop] = (vals - lse).float()
        return False


@torch.no_grad()
def chunked_topk(head: Head, k: int, temperature: float, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """Top-k token ids and their log-probs under softmax(z/T) over the full vocabulary, chunk by chunk."""
    n, device = head.hidden.shape[0], head.hidden.device
    acc = accumulation_dtype(head.hidden, head.weight)
    step = _TopK(n, k, temperature, device)
    rows = chunk_size or default_chunk_rows(device, 1, head.vocab, n)
    _engine.run(_engine.row_chunks(n, rows), head, step, acc_dtype=acc)
    return step.ids, step.lps
