"""The tile-fused strategy: Triton tl.dot tiles, the logits never exist, not even per chunk.

Like Cut Cross-Entropy, the forward computes only row log-sum-exps (tiles folded into an online
softmax) and the few logits it needs (labels, stored top-k ids); the backward recomputes each
tile and adds its dX / dW / db share with fp32 atomics. Memory is the inputs, the fp32
gradients and O(N) statistics. It serves cross-entropy, log-probs, offline top-k KD and the
streaming top-k; online-proxy KD (two heads) is not served here and runs on the chunk engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from proxykd_fast.ops.configs import TileConfig
from proxykd_fast.ops.gather_logits import gather_logits
from proxykd_fast.ops.linear_grad import GradTerms, tile_grad
from proxykd_fast.ops.linear_lse import row_lse
from proxykd_fast.ops.linear_topk import MAX_STREAMING_K, streaming_topk

from ._engine import kept_rows
from ._spec import Head, KDBatch, LossSpec, first_order_only


@dataclass(frozen=True)
class TileFusedOptions:
    """Knobs of the tile-fused kernels (the defaults are exact)."""

    grad_skip_eps: float = 0.0  # tiles whose max |dlogits| is <= this are skipped in the backward
    topk_bitonic: bool | None = None  # merge tiles with tl.topk (GPU) or max-extraction; None: by platform
    topk_config: TileConfig | None = None  # the top-k tile shape; None: ops.configs' table


def _operands(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Contiguous hidden (in the weight's dtype, as the GEMM reads it) and weight."""
    return hidden.to(weight.dtype).contiguous(), weight.contiguous()


def _row_grad(grad: Tensor, spec: LossSpec, n: int) -> Tensor:
    """Per-row upstream gradient of the reduced (or per-row) loss, fp32 [N]."""
    if spec.reduction == "none":
        return grad.reshape(-1).float()
    g = grad.float() / spec.denominator if spec.reduction == "mean" else grad.float()
    return g.expand(n)


def _offline_targets(lps: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(log p, p, mass) of the renormalized tempered top-k targets; all -inf rows carry no mass."""
    log_p = torch.log_softmax(lps.float() / temperature, dim=1)
    finite = torch.isfinite(log_p).any(dim=1)
    p = torch.where(finite[:, None], log_p.exp(), torch.zeros_like(log_p))
    return log_p, p, finite.float()


def _grads(dx: Tensor | None, dw: Tensor | None, db: Tensor | None, dtypes: tuple) -> tuple:
    """fp32 gradients cast back to their inputs' dtypes."""
    h_dtype, w_dtype, b_dtype = dtypes
    return (None if dx is None else dx.to(h_dtype), None if dw is None else dw.to(w_dtype),
            None if db is None else db.to(b_dtype))


class TileFusedKD(torch.autograd.Function):
    """NLL (+ offline top-k forward KL) with tile-fused kernels; returns (loss, nll_sum, kd_sum)."""

    @staticmethod
    def forward(ctx, hs, ws, bs, labels, ids, lps, row_weight, spec, options):
        x, w = _operands(hs, ws)
        n = x.shape[0]
        T = spec.temperature
        offline = ids is not None
        two = offline and T != 1.0
        valid = labels != spec.ignore_index
        y = torch.where(valid, labels, torch.zeros_like(labels))
        cols = torch.cat([y[:, None], ids], 1) if offline else y[:, None]
        if n:
            lse1, lse2 = row_lse(x, w, bs, 1.0, 1.0 / T if two else None)
            z = gather_logits(x, w, bs, cols)
        else:
            lse1 = torch.zeros(0, device=x.device)
            lse2, z = None, torch.zeros(0, cols.shape[1], device=x.device)
        validf = valid.float()
        nll = (lse1 - z[:, 0]) * validf
        rows = nll if spec.nll_weight == 1.0 else spec.nll_weight * nll
        kd_sum = torch.zeros((), device=x.device, dtype=torch.float64)
        p = mass = kd_w = None
        if offline:
            log_p, p, mass = _offline_targets(lps, T)
            log_qt = z[:, 1:] / T - (lse2 if two else lse1)[:, None]
            kd = (T * T) * (p * torch.where(p > 0, log_p - log_qt, torch.zeros_like(log_qt))).sum(1) * validf
            kd_w = validf * spec.alpha
            if row_weight is not None:
                kd_w = kd_w * row_weight.float()
            rows = rows + kd_w * kd
            kd_sum = kd.sum(dtype=torch.float64)
        ctx.spec, ctx.options, ctx.two = spec, options, two
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        ctx.save_for_backward(x, w, bs, lse1, lse2, cols, validf, p, mass, kd_w)
        nll_sum = nll.sum(dtype=torch.float64)
        ctx.mark_non_differentiable(nll_sum, kd_sum)
        if spec.reduction == "none":
            return rows, nll_sum, kd_sum
        loss = (rows.sum(dtype=torch.float64) / spec.denominator).float()
        return loss, nll_sum, kd_sum

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, _g_nll, _g_kd):
        x, w, bs, lse1, lse2, cols, validf, p, mass, kd_w = ctx.saved_tensors
        spec, T = ctx.spec, ctx.spec.temperature
        c_row = _row_grad(grad_loss, spec, x.shape[0]) * validf
        c_nll = c_row if spec.nll_weight == 1.0 else c_row * spec.nll_weight
        coef_a, coef_b = c_nll, None
        sp_coef = -c_nll[:, None]
        if p is not None:
            c_t = c_row * kd_w * T  # d(T^2 KL)/dz = T (mass q_T - sum_k p_k onehot(id_k))
            if ctx.two:
                coef_b = c_t * mass
            else:
                coef_a = c_nll + c_t * mass
            sp_coef = torch.cat([sp_coef, -c_t[:, None] * p], 1)
        terms = GradTerms(lse1, coef_a, cols, sp_coef, 1.0, lse2, coef_b, 1.0 / T if ctx.two else None)
        dx, dw, db = tile_grad(x, w, bs, terms, tuple(ctx.needs_input_grad[:3]), ctx.options.grad_skip_eps)
        return (*_grads(dx, dw, db, ctx.dtypes), None, None, None, None, None, None)


class TileFusedLogProbs(torch.autograd.Function):
    """Per-token log softmax(z/T)[y] with tile-fused kernels; differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, options):
        x, w = _operands(hidden, weight)
        valid = labels != ignore_index
        y = torch.where(valid, labels, torch.zeros_like(labels))[:, None]
        if x.shape[0]:
            lse, _ = row_lse(x, w, bias, 1.0 / temperature, None)
            out = (gather_logits(x, w, bias, y)[:, 0] / temperature - lse) * valid
        else:
            lse = out = torch.zeros(0, device=x.device)
        ctx.save_for_backward(x, w, bias, lse, y, valid)
        ctx.temperature, ctx.options = temperature, options
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        x, w, bias, lse, y, valid = ctx.saved_tensors
        c = grad_out.reshape(-1).float() * valid / ctx.temperature  # d logp_y/dz = (onehot - q_T) / T
        terms = GradTerms(lse, -c, y, c[:, None], 1.0 / ctx.temperature)
        dx, dw, db = tile_grad(x, w, bias, terms, tuple(ctx.needs_input_grad[:3]), ctx.options.grad_skip_eps)
        return (*_grads(dx, dw, db, ctx.dtypes), None, None, None, None)


@dataclass(frozen=True)
class TileFused:
    """The tile-fused strategy of a backend: which entry points it serves, and its kernel options.

    Each method returns None where it does not serve the call; the backend then runs the chunk engine.
    """

    kd_and_log_probs: bool = True  # False: only the streaming top-k (the chunked Triton backend)
    options: TileFusedOptions = TileFusedOptions()

    def kd(self, batch: KDBatch, spec: LossSpec) -> tuple[Tensor, Tensor, Tensor] | None:
        """CE and offline top-k KD over the non-ignored rows; None for an online proxy (two heads: the
        chunk engine's job) and for a batch without any valid row (the engine's empty pass)."""
        if not self.kd_and_log_probs or batch.proxy is not None:
            return None
        idx = kept_rows(batch.labels != spec.ignore_index)
        if (batch.labels.numel() if idx is None else idx.numel()) == 0:
            return None
        s = batch.student

        def take(t: Tensor | None) -> Tensor | None:  # ignored rows (NaN padding included) never enter a tile
            return t if t is None or idx is None else t.index_select(0, idx)

        rows, nll_sum, kd_sum = TileFusedKD.apply(take(s.hidden), s.weight, s.bias, take(batch.labels),
                                                  take(batch.topk_ids), take(batch.topk_logprobs),
                                                  take(batch.row_weight), spec, self.options)
        if spec.reduction == "none" and idx is not None:
            rows = rows.new_zeros(batch.labels.shape[0]).index_copy(0, idx, rows)
        return rows, nll_sum, kd_sum

    def log_probs(self, head: Head, labels: Tensor, temperature: float, ignore_index: int) -> Tensor | None:
        """Per-token tempered log-probs over the non-ignored rows (no chunks at all); 0 on ignored rows."""
        if not self.kd_and_log_probs:
            return None
        idx = kept_rows(labels != ignore_index)
        if (labels.numel() if idx is None else idx.numel()) == 0:
            return None
        if idx is None:
            return TileFusedLogProbs.apply(head.hidden, head.weight, head.bias, labels, temperature, ignore_index,
                                           self.options)
        out = TileFusedLogProbs.apply(head.hidden.index_select(0, idx), head.weight, head.bias,
                                      labels.index_select(0, idx), temperature, ignore_index, self.options)
        return out.new_zeros(labels.shape[0]).index_copy(0, idx, out)

    def topk(self, head: Head, k: int, temperature: float) -> tuple[Tensor, Tensor] | None:
        """The streaming top-k for 1 <= k <= 64 over at least one row."""
        if k > MAX_STREAMING_K or head.hidden.shape[0] == 0:
            return None
        x, w = _operands(head.hidden, head.weight)
        return streaming_topk(x, w, head.bias, k, temperature, bitonic=self.options.topk_bitonic,
                              config=self.options.topk_config)
