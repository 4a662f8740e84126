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


def reference_sequence_logps(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, average: bool,
                             ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """(per-row log-prob sum or mean, per-row sum) of [rows, T] labels from materialized logits (>= fp32)."""
    z = h @ w.t()
    if b is not None:
        z = z + b
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    mask = y != ignore_index
    tok = torch.log_softmax(z, -1).gather(-1, torch.where(mask, y, 0)[..., None]).squeeze(-1)
    tok = torch.where(mask, tok, torch.zeros_like(tok))
    total = tok.sum(-1)
    n = mask.sum(-1).clamp(min=1).to(total.dtype)
    return (total / n if average else total), total


def reference_dpo(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, *, ref_logps: Tensor | None = None,
                  ref: tuple | None = None, beta: float = 0.1, loss_type: str = "sigmoid", nll_alpha: float = 0.0,
                  sample_weight: Tensor | None = None, average_log_prob: bool = False,
                  label_smoothing: float = 0.0, ignore_index: int = -100) -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO-family loss of `dpo_loss` written out directly from its formulas (softplus forms) over full
    [2B, T, V] logits, with its metrics: the oracle of the tests and benchmarks.

    h [2B, T, H] (B chosen rows, then B rejected), labels y [2B, T]; the reference is `ref_logps` [2B]
    (summed) or an online `ref` = (hidden, weight, bias).
    """
    avg = average_log_prob or loss_type == "ipo"
    seq, total = reference_sequence_logps(h, w, b, y, avg, ignore_index)
    if ref is not None:
        with torch.no_grad():
            ref_logps = reference_sequence_logps(*ref, y, False, ignore_index)[1]
    ref_sums = ref_logps.to(seq.dtype)  # the reference is always given as sums (TRL's convention)
    n_tok = (y != ignore_index).sum(-1).clamp(min=1).to(seq.dtype)
    ref_scaled = ref_sums / n_tok if avg else ref_sums
    B = h.shape[0] // 2
    dc, dr = seq[:B] - ref_scaled[:B], seq[B:] - ref_scaled[B:]
    m = dc - dr
    ls = label_smoothing
    if loss_type == "sigmoid":
        per = (1 - ls) * F.softplus(-beta * m) + ls * F.softplus(beta * m)
    elif loss_type == "robust":
        per = ((1 - ls) * F.softplus(-beta * m) - ls * F.softplus(beta * m)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        per = (1 - beta * m).clamp(min=0)
    elif loss_type == "ipo":
        per = (m - 0.5 / beta).pow(2)
    else:
        per = 1 - 1 / (1 + torch.exp(-beta * dc)) + 1 / (1 + torch.exp(-beta * dr))
    wts = torch.ones(B, dtype=per.dtype, device=per.device) if sample_weight is None else sample_weight.to(per.dtype)
    n_chosen = int((y[:B] != ignore_index).sum())
    nll = -total[:B].sum() / max(n_chosen, 1)
    loss = (wts * per).sum() / B + nll_alpha * nll
    # TRL logs from sums (for ipo too); with average_log_prob the per-token means the loss then uses
    m_seq, m_ref = ((total / n_tok, ref_sums / n_tok) if average_log_prob else (total, ref_sums))
    m_seq = m_seq.detach()
    rc, rr = beta * (m_seq[:B] - m_ref[:B]), beta * (m_seq[B:] - m_ref[B:])
    metrics = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
               "rewards/accuracies": (rc > rr).to(rc.dtype).mean(), "rewards/margins": (rc - rr).mean(),
               "logps/chosen": m_seq[:B].mean(), "logps/rejected": m_seq[B:].mean(),
               "nll": nll.detach()}
    return loss, metrics
