"""The reference backend: materializes the full logits and lets autograd differentiate.

It is the oracle the tests compare every backend with (run in fp64), and the "plain torch at
the same dtype" baseline for error bounds: logits come from one GEMM in the input dtype and
are upcast to fp32 before the softmax, as Hugging Face models do.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ._spec import Head, KDBatch, LossSpec


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Full [N, V] logits in at least fp32."""
    z = F.linear(hidden.to(weight.dtype), weight, bias)
    return z if z.dtype == torch.float64 else z.float()


def _weighted(w: Tensor, log_w: Tensor, log_other: Tensor) -> Tensor:
    """w * (log w - log other) per entry, 0 where w == 0 (0 log 0 = 0; a token masked on both sides)."""
    return w * torch.where(w > 0, log_w - log_other, torch.zeros_like(log_w))


def divergence_rows(zs: Tensor, batch: KDBatch, opts: LossSpec) -> Tensor:
    """T^2 * D(p, q_T) per row from full student logits, following the documented formulas."""
    T = opts.temperature
    log_q = torch.log_softmax(zs / T, dim=-1)
    if batch.topk_ids is not None:
        log_p = torch.log_softmax(batch.topk_logprobs.to(zs.dtype) / T, dim=-1)
        has_mass = torch.isfinite(log_p).any(dim=-1, keepdim=True)  # an all -inf row carries no target
        log_p = torch.where(has_mass, log_p, torch.zeros_like(log_p))
        p = torch.where(has_mass, log_p.exp(), torch.zeros_like(log_p))
        return T * T * _weighted(p, log_p, log_q.gather(1, batch.topk_ids)).sum(-1)
    with torch.no_grad():
        zp = _logits(batch.proxy.hidden, batch.proxy.weight, batch.proxy.bias).to(zs.dtype)
        log_p = torch.log_softmax(zp / T, dim=-1)
    if opts.divergence == "forward_kl":
        d = _weighted(log_p.exp(), log_p, log_q).sum(-1)
    elif opts.divergence == "reverse_kl":
        d = _weighted(log_q.exp(), log_q, log_p).sum(-1)
    else:
        b = opts.jsd_beta
        none = torch.isneginf(log_p) & torch.isneginf(log_q)  # masked on both sides: keep autograd off -inf - -inf
        log_m = torch.logaddexp(torch.where(none, 0.0, log_p) + math.log(b), torch.where(none, 0.0, log_q)
                                + math.log1p(-b))
        d = b * _weighted(log_p.exp(), log_p, log_m).sum(-1) + (1 - b) * _weighted(log_q.exp(), log_q, log_m).sum(-1)
    return T * T * d


def _valid_rows(batch: KDBatch, ignore_index: int) -> tuple[Tensor, KDBatch]:
    """The indices of the non-ignored rows and the batch restricted to them (ignored rows never enter)."""
    idx = (batch.labels != ignore_index).nonzero().view(-1)
    s, p = batch.student, batch.proxy

    def take(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.index_select(0, idx)

    return idx, replace(batch, student=Head(take(s.hidden), s.weight, s.bias), labels=take(batch.labels),
                        proxy=None if p is None else Head(take(p.hidden), p.weight, p.bias),
                        topk_ids=take(batch.topk_ids), topk_logprobs=take(batch.topk_logprobs),
                        row_weight=take(batch.row_weight))


def reference_kd(batch: KDBatch, opts: LossSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Loss as the public API defines it, over the non-ignored rows; returns (loss, nll_sum, kd_sum)."""
    n = batch.labels.shape[0]
    idx, batch = _valid_rows(batch, opts.ignore_index)
    zs = _logits(batch.student.hidden, batch.student.weight, batch.student.bias)
    nll = -torch.log_softmax(zs, dim=-1).gather(1, batch.labels[:, None]).squeeze(1)
    rows = nll if opts.nll_weight == 1.0 else opts.nll_weight * nll
    kd_sum = torch.zeros((), dtype=torch.float64, device=zs.device)
    if opts.divergence is not None:
        kd = divergence_rows(zs, batch, opts)
        w = torch.full_like(kd, opts.alpha)
        if batch.row_weight is not None:
            w = w * batch.row_weight.to(kd.dtype)
        rows = rows + w * kd
        kd_sum = kd.detach().sum(dtype=torch.float64)
    nll_sum = nll.detach().sum(dtype=torch.float64)
    if opts.reduction == "none":
        return torch.zeros(n, dtype=rows.dtype, device=rows.device).index_copy(0, idx, rows), nll_sum, kd_sum
    return rows.sum() / opts.denominator, nll_sum, kd_sum


def reference_log_probs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float, ignore_index: int
) -> Tensor:
    """Per-token log softmax(z/T)[y] over the non-ignored rows, 0 on ignored rows."""
    idx = (labels != ignore_index).nonzero().view(-1)
    z = _logits(hidden.index_select(0, idx), weight, bias) / temperature
    lp = torch.log_softmax(z, dim=-1).gather(1, labels.index_select(0, idx)[:, None]).squeeze(1)
    return torch.zeros(labels.shape[0], dtype=lp.dtype, device=lp.device).index_copy(0, idx, lp)


def reference_log_probs_entropy(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Per-token log softmax(z/T)[y] and entropy -sum q log q of q = softmax(z/T); 0 on ignored rows."""
    idx = (labels != ignore_index).nonzero().view(-1)
    log_q = torch.log_softmax(_logits(hidden.index_select(0, idx), weight, bias) / temperature, dim=-1)
    lp = log_q.gather(1, labels.index_select(0, idx)[:, None]).squeeze(1)
    q = log_q.exp()
    h = -(q * torch.where(q > 0, log_q, torch.zeros_like(log_q))).sum(-1)
    zeros = torch.zeros(labels.shape[0], dtype=lp.dtype, device=lp.device)
    return zeros.index_copy(0, idx, lp), zeros.index_copy(0, idx, h)


@torch.no_grad()
def reference_topk(hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Top-k ids and log-probs from the full log-softmax."""
    lp = torch.log_softmax(_logits(hidden, weight, bias) / temperature, dim=-1)
    vals, ids = torch.topk(lp, k, dim=-1)
    return ids, vals.float()
