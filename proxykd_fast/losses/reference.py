"""The reference backend: materializes the full logits and lets autograd differentiate.

It is the oracle the tests compare every backend with (run in fp64), and the "plain torch at
the same dtype" baseline for error bounds: logits come from one GEMM in the input dtype and
are upcast to fp32 before the softmax, as Hugging Face models do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._spec import KDBatch, LossSpec


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Full [N, V] logits in at least fp32."""
    z = F.linear(hidden.to(weight.dtype), weight, bias)
    return z if z.dtype == torch.float64 else z.float()


def divergence_rows(zs: Tensor, batch: KDBatch, opts: LossSpec) -> Tensor:
    """T^2 * D(p, q_T) per row from full student logits, following the documented formulas."""
    T = opts.temperature
    log_q = torch.log_softmax(zs / T, dim=-1)
    if batch.topk_ids is not None:
        log_p = torch.log_softmax(batch.topk_logprobs.to(zs.dtype) / T, dim=-1)
        has_mass = torch.isfinite(log_p).any(dim=-1, keepdim=True)  # an all -inf row carries no target
        log_p = torch.where(has_mass, log_p, torch.zeros_like(log_p))
        p = torch.where(has_mass, log_p.exp(), torch.zeros_like(log_p))
        terms = p * (log_p - log_q.gather(1, batch.topk_ids))
        d = torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)
        return T * T * d
    with torch.no_grad():
        zp = _logits(batch.proxy.hidden, batch.proxy.weight, batch.proxy.bias).to(zs.dtype)
        log_p = torch.log_softmax(zp / T, dim=-1)
    if opts.divergence == "forward_kl":
        d = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif opts.divergence == "reverse_kl":
        d = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        b = opts.jsd_beta
        log_m = torch.logaddexp(log_p + math.log(b), log_q + math.log1p(-b))
        d = b * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - b) * (log_q.exp() * (log_q - log_m)).sum(-1)
    return T * T * d


def reference_kd(batch: KDBatch, opts: LossSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Loss as the public API defines it; returns (loss, nll_sum, kd_sum)."""
    zs = _logits(batch.student.hidden, batch.student.weight, batch.student.bias)
    valid = batch.labels != opts.ignore_index
    y = torch.where(valid, batch.labels, torch.zeros_like(batch.labels))
    nll = -torch.log_softmax(zs, dim=-1).gather(1, y[:, None]).squeeze(1)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    rows = nll
    kd_sum = torch.zeros((), dtype=torch.float64, device=zs.device)
    if opts.divergence is not None:
        kd = divergence_rows(zs, batch, opts)
        kd = torch.where(valid, kd, torch.zeros_like(kd))
        w = torch.full_like(kd, opts.alpha)
        if batch.row_weight is not None:
            w = w * batch.row_weight.to(kd.dtype)
        rows = rows + w * kd
        kd_sum = kd.detach().sum(dtype=torch.float64)
    nll_sum = nll.detach().sum(dtype=torch.float64)
    if opts.reduction == "none":
        return rows, nll_sum, kd_sum
    total = rows.sum()
    return total / opts.denominator, nll_sum, kd_sum


def reference_log_probs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float, ignore_index: int
) -> Tensor:
    """Per-token log softmax(z/T)[y], 0 on ignored rows."""
    z = _logits(hidden, weight, bias) / temperature
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    lp = torch.log_softmax(z, dim=-1).gather(1, y[:, None]).squeeze(1)
    return torch.where(valid, lp, torch.zeros_like(lp))


@torch.no_grad()
def reference_topk(hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Top-k ids and log-probs from the full log-softmax."""
    lp = torch.log_softmax(_logits(hidden, weight, bias) / temperature, dim=-1)
    vals, ids = torch.topk(lp, k, dim=-1)
    return ids, vals.float()
