"""The chunked backend: fused linear + loss over row chunks, logits never exist beyond a chunk.

Rows whose label is ignore_index (prompts, padding) cost nothing: each chunk of C valid rows gets
its logits from one GEMM per model, an epilogue turns them into row losses and dlogits in place,
and two more GEMMs give dX and add into an fp32 dW. With a scalar
upstream gradient (reduction mean/sum) all of this runs in the forward and the backward only
rescales; with reduction="none" the backward recomputes the chunks with the per-row gradients.
The epilogue is pluggable so the Triton backend reuses this driver with its own kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ._epilogue_torch import torch_epilogue
from ._gemm import (
    accumulate_grad_weight,
    default_chunk_rows,
    grad_input_chunk,
    grad_operand,
    logits_into,
    workspace,
)
from ._validation import KDBatch, KDOptions

Epilogue = Callable[..., tuple[Tensor, Tensor | None]]


def buffers_needed(opts: KDOptions, online: bool, dtype: torch.dtype = torch.float32) -> int:
    """How many [C, V] scratch buffers the torch epilogue needs: S, then P when online, then R.

    An epilogue may declare its own need with a `buffers_needed(opts, online, dtype)` attribute.
    """
    if opts.divergence is None:
        return 1
    if not online:
        return 1 if opts.temperature == 1.0 else 2
    return 3


@dataclass
class ChunkResult:
    """What one pass over all chunks produced."""

    row_loss: Tensor  # [N] fp32 (fp64 for fp64 inputs), 0 on ignored rows
    nll_sum: Tensor  # scalar fp64
    kd_sum: Tensor  # scalar fp64, unweighted T^2 * D summed over valid rows
    grad_hidden: Tensor | None = None
    grad_weight: Tensor | None = None  # fp32 (or fp64) accumulator
    grad_bias: Tensor | None = None


def run_chunks(
    batch: KDBatch,
    opts: KDOptions,
    row_grad: Tensor | float | None,
    *,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    epilogue: Epilogue = torch_epilogue,
) -> ChunkResult:
    """One pass over the rows: row losses, and gradients scaled by `row_grad` (scalar or [N])."""
    hs, ws, bs = batch.student_hidden, batch.student_weight, batch.student_bias
    n, vocab = hs.shape[0], ws.shape[0]
    device = hs.device
    wide = any(t is not None and t.dtype == torch.float64 for t in (hs, ws, batch.proxy_hidden, batch.proxy_weight))
    acc_dtype = torch.float64 if wide else torch.float32
    online = batch.proxy_weight is not None
    need_grad = row_grad is not None and (grad_hidden or grad_weight or grad_bias)
    nbuf = getattr(epilogue, "buffers_needed", buffers_needed)(opts, online, acc_dtype)
    labels = batch.labels
    # Ignored rows (prompts, padding) cost no GEMM: chunks are cut over the valid rows only.
    order = (labels != opts.ignore_index).nonzero().view(-1) if n else None
    if order is not None and order.numel() == n:
        order = None  # every row counts: plain slices, no gathers
    m = n if order is None else order.numel()
    rows = opts.chunk_size or default_chunk_rows(device, nbuf, vocab, m)
    rows = max(1, min(rows, m))
    bufs = workspace(device, nbuf, rows, vocab, acc_dtype) if m else []

    row_loss = torch.zeros(n, device=device, dtype=acc_dtype)
    nll_sum = torch.zeros((), device=device, dtype=torch.float64)
    kd_sum = torch.zeros((), device=device, dtype=torch.float64)
    d_hidden = None
    if need_grad and grad_hidden:
        d_hidden = torch.empty_like(hs) if order is None else torch.zeros_like(hs)
    d_weight = torch.zeros(ws.shape, device=device, dtype=acc_dtype) if need_grad and grad_weight else None
    d_bias = torch.zeros(vocab, device=device, dtype=acc_dtype) if need_grad and grad_bias else None
    scalar_grad = not isinstance(row_grad, Tensor)

    for start in range(0, m, rows):
        stop = min(start + rows, m)
        c = stop - start
        idx = None if order is None else order[start:stop]
        take = functools.partial(_chunk_rows, start=start, stop=stop, idx=idx)
        x = take(hs)
        S = logits_into(bufs[0][:c], x, ws, bs)
        P = R = None
        if online and nbuf >= 2:
            P = logits_into(bufs[1][:c], take(batch.proxy_hidden), batch.proxy_weight, batch.proxy_bias)
        if nbuf > (2 if online else 1):
            R = bufs[-1][:c]
        y = take(labels)
        valid = y != opts.ignore_index
        y_safe = torch.where(valid, y, torch.zeros_like(y))
        validf = valid.to(acc_dtype)
        g = validf * (row_grad if scalar_grad and row_grad is not None else 1.0)
        if not scalar_grad:
            g = g * take(row_grad).to(acc_dtype)
        kd_scale = validf * opts.alpha
        if batch.row_weight is not None:
            kd_scale = kd_scale * take(batch.row_weight).to(acc_dtype)
        ids = lps = None
        if batch.topk_ids is not None:
            ids, lps = take(batch.topk_ids), take(batch.topk_logprobs).to(acc_dtype)
        nll, kd = epilogue(S, P, R, ids, lps, y_safe, g, g * kd_scale, opts, need_grad)
        nll = nll * validf
        loss = nll
        nll_sum += nll.sum(dtype=torch.float64)
        if kd is not None:
            kd = kd * validf
            kd_sum += kd.sum(dtype=torch.float64)
            loss = loss + kd_scale * kd
        if idx is None:
            row_loss[start:stop] = loss
        else:
            row_loss.index_copy_(0, idx, loss.to(acc_dtype))
        if need_grad:
            G = grad_operand(S, ws)
            if d_hidden is not None:
                dx = grad_input_chunk(G, ws)
                if idx is None:
                    d_hidden[start:stop] = dx
                else:
                    d_hidden.index_copy_(0, idx, dx.to(d_hidden.dtype))
            if d_weight is not None:
                accumulate_grad_weight(d_weight, S, x, G)
            if d_bias is not None:
                d_bias += S.sum(0)
    return ChunkResult(row_loss, nll_sum, kd_sum, d_hidden, d_weight, d_bias)


def _chunk_rows(t: Tensor, *, start: int, stop: int, idx: Tensor | None) -> Tensor:
    """A chunk's rows of a per-row tensor: a slice, or the gathered valid rows."""
    return t[start:stop] if idx is None else t.index_select(0, idx)


def _scale(t: Tensor | None, s: Tensor, dtype: torch.dtype | None = None) -> Tensor | None:
    """Multiply a saved gradient by the upstream scalar (skipped when it is exactly 1)."""
    if t is None:
        return None
    if not (s.numel() == 1 and float(s) == 1.0):
        t = t * s.to(t.dtype)
    return t if dtype is None else t.to(dtype)


class FusedLinearKD(torch.autograd.Function):
    """Autograd wrapper: returns (loss, nll_sum, kd_sum); only `loss` is differentiable."""

    @staticmethod
    def forward(ctx, hs, ws, bs, labels, hp, wp, bp, ids, lps, row_weight, opts, epilogue):  # noqa: D102
        batch = KDBatch(hs, ws, bs, labels, hp, wp, bp, ids, lps, row_weight)
        gh, gw, gb = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ctx.opts, ctx.epilogue = opts, epilogue
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        if opts.reduction == "none":
            res = run_chunks(batch, opts, None, grad_hidden=False, grad_weight=False, grad_bias=False, epilogue=epilogue)
            ctx.save_for_backward(hs, ws, bs, labels, hp, wp, bp, ids, lps, row_weight)
            ctx.mark_non_differentiable(res.nll_sum, res.kd_sum)
            return res.row_loss, res.nll_sum, res.kd_sum
        scale = 1.0 / opts.denominator
        res = run_chunks(batch, opts, scale, grad_hidden=gh, grad_weight=gw, grad_bias=gb, epilogue=epilogue)
        ctx.save_for_backward(res.grad_hidden, res.grad_weight, res.grad_bias)
        ctx.mark_non_differentiable(res.nll_sum, res.kd_sum)
        loss = (res.row_loss.sum(dtype=torch.float64) * scale).to(res.row_loss.dtype)
        return loss, res.nll_sum, res.kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _g_nll, _g_kd):  # noqa: D102
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.opts.reduction != "none":
            dh, dw, db = ctx.saved_tensors
            return (_scale(dh, grad_loss), _scale(dw, grad_loss, w_dtype), _scale(db, grad_loss, b_dtype),
                    *([None] * 9))
        hs, ws, bs, labels, hp, wp, bp, ids, lps, row_weight = ctx.saved_tensors
        batch = KDBatch(hs, ws, bs, labels, hp, wp, bp, ids, lps, row_weight)
        gh, gw, gb = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        res = run_chunks(batch, ctx.opts, grad_loss.reshape(-1), grad_hidden=gh, grad_weight=gw, grad_bias=gb,
                         epilogue=ctx.epilogue)
        dw = None if res.grad_weight is None else res.grad_weight.to(w_dtype)
        db = None if res.grad_bias is None else res.grad_bias.to(b_dtype)
        return (res.grad_hidden, dw, db, *([None] * 9))


def fused_linear_kd(batch: KDBatch, opts: KDOptions, epilogue: Epilogue = torch_epilogue) -> tuple[Tensor, Tensor, Tensor]:
    """Run the fused NLL(+KD) over a validated batch; returns (loss, nll_sum, kd_sum)."""
    hs, ws, bs = batch.student_hidden, batch.student_weight, batch.student_bias
    if not torch.is_grad_enabled():  # autograd.Function still reports needs_input_grad under no_grad
        hs, ws, bs = hs.detach(), ws.detach(), None if bs is None else bs.detach()
    return FusedLinearKD.apply(
        hs, ws, bs, batch.labels,
        batch.proxy_hidden, batch.proxy_weight, batch.proxy_bias, batch.topk_ids, batch.topk_logprobs,
        batch.row_weight, opts, epilogue,
    )


# --------------------------------------------------------------------------------------------
# Per-token log-probabilities (tempered), differentiable with any per-token upstream gradient.


def _token_logprob_pass(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float, ignore_index: int,
    chunk_size: int | None, row_grad: Tensor | None, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """log softmax(z/T)[y] per row; with row_grad, also dX, dW, db of sum(row_grad * logp)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    acc_dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    rows = max(1, min(chunk_size or default_chunk_rows(device, 1, vocab, n), n))
    (S_full,) = workspace(device, 1, rows, vocab, acc_dtype) if n else (None,)
    need_grad = row_grad is not None
    out = torch.zeros(n, device=device, dtype=torch.float32 if acc_dtype == torch.float32 else acc_dtype)
    d_hidden = torch.empty_like(hidden) if need_grad and grad_hidden else None
    d_weight = torch.zeros(weight.shape, device=device, dtype=acc_dtype) if need_grad and grad_weight else None
    d_bias = torch.zeros(vocab, device=device, dtype=acc_dtype) if need_grad and grad_bias else None
    inv_t = 1.0 / temperature
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        S = logits_into(S_full[: stop - start], hidden[start:stop], weight, bias)
        y = labels[start:stop]
        valid = y != ignore_index
        y_safe = torch.where(valid, y, torch.zeros_like(y))
        if inv_t != 1.0:
            S.mul_(inv_t)
        torch.log_softmax(S, 1, out=S)
        lp = S.gather(1, y_safe[:, None]).view(-1) * valid
        out[start:stop] = lp
        if need_grad:
            # d logp_y / dz = (onehot(y) - softmax(z/T)) / T
            c = row_grad[start:stop].to(acc_dtype) * valid * inv_t
            S.exp_().mul_((-c)[:, None])
            S.scatter_add_(1, y_safe[:, None], c[:, None])
            if d_hidden is not None:
                d_hidden[start:stop] = grad_input_chunk(S, weight)
            if d_weight is not None:
                accumulate_grad_weight(d_weight, S, hidden[start:stop])
            if d_bias is not None:
                d_bias += S.sum(0)
    return out, d_hidden, d_weight, d_bias


class FusedLinearLogProbs(torch.autograd.Function):
    """Per-token tempered log-probs [N]; the backward recomputes logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, chunk_size):  # noqa: D102
        out, *_ = _token_logprob_pass(hidden, weight, bias, labels, temperature, ignore_index, chunk_size,
                                      None, False, False, False)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.args = (temperature, ignore_index, chunk_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        hidden, weight, bias, labels = ctx.saved_tensors
        gh, gw, gb = ctx.needs_input_grad[:3]
        _, dh, dw, db = _token_logprob_pass(hidden, weight, bias, labels, *ctx.args, grad_out, gh, gw, gb)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None, None


# --------------------------------------------------------------------------------------------
# Streaming top-k over the full-vocab softmax.


@torch.no_grad()
def chunked_topk(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int, temperature: float, chunk_size: int | None
) -> tuple[Tensor, Tensor]:
    """Top-k token ids and their log-probs under softmax(z/T) over the full vocabulary."""
    n, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    acc_dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    rows = max(1, min(chunk_size or default_chunk_rows(device, 1, vocab, n), n))
    ids = torch.empty(n, k, device=device, dtype=torch.int64)
    lps = torch.empty(n, k, device=device, dtype=torch.float32)
    if n == 0:
        return ids, lps
    (S_full,) = workspace(device, 1, rows, vocab, acc_dtype)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        S = logits_into(S_full[: stop - start], hidden[start:stop], weight, bias)
        if temperature != 1.0:
            S.mul_(1.0 / temperature)
        lse = torch.logsumexp(S, 1, keepdim=True)
        vals, idx = torch.topk(S, k, dim=1)
        ids[start:stop] = idx
        lps[start:stop] = (vals - lse).float()
    return ids, lps


def with_chunk(opts: KDOptions, chunk_size: int | None) -> KDOptions:
    """Options with a chunk size override."""
    return replace(opts, chunk_size=chunk_size)
