"""DPO on fused heads: uses `proxykd_fast.losses.dpo` when present, else a local equivalent."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from proxykd_fast.losses import linear_log_probs

try:  # the shared implementations, when they have landed
    from proxykd_fast.losses.dpo import dpo_loss as _shared_dpo_loss
except ImportError:  # pragma: no cover - depends on the tree state
    _shared_dpo_loss = None
try:
    from proxykd_fast.losses.sequence import sequence_log_probs as _shared_seq_logps
except ImportError:  # pragma: no cover - depends on the tree state
    _shared_seq_logps = None


def sequence_log_probs(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, average: bool = False, bias: Tensor | None = None,
    chunk_size: int | None = None, backend: str = "auto",
) -> Tensor:
    """Summed (or mean) log-prob of each row's labelled tokens, shape [rows]."""
    if _shared_seq_logps is not None:
        return _shared_seq_logps(hidden, weight, labels, average=average, bias=bias, chunk_size=chunk_size,
                                 backend=backend)
    lp = linear_log_probs(hidden, weight, labels, bias=bias, chunk_size=chunk_size, backend=backend)
    mask = (labels != -100).to(lp.dtype)
    total = (lp * mask).sum(-1)
    return total / mask.sum(-1).clamp_min(1) if average else total


def dpo_loss(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, ref_logps: Tensor, beta: float = 0.1,
    loss_type: str = "sigmoid", nll_alpha: float = 0.0, average_log_prob: bool = False,
    bias: Tensor | None = None, chunk_size: int | None = None, backend: str = "auto",
) -> tuple[Tensor, dict[str, Any]]:
    """Mean over pairs of DPO(chosen rows first, rejected rows second) + nll_alpha * chosen NLL per token."""
    if _shared_dpo_loss is not None:
        return _shared_dpo_loss(hidden, weight, labels, ref_logps=ref_logps, beta=beta, loss_type=loss_type,
                                nll_alpha=nll_alpha, average_log_prob=average_log_prob, bias=bias,
                                chunk_size=chunk_size, backend=backend)
    lp = linear_log_probs(hidden, weight, labels, bias=bias, chunk_size=chunk_size, backend=backend)
    mask = (labels != -100).to(lp.dtype)
    seq = (lp * mask).sum(-1)
    ntok = mask.sum(-1).clamp_min(1)
    logps = seq / ntok if average_log_prob else seq
    b = hidden.shape[0] // 2
    chosen, rejected = logps[:b], logps[b:]
    ref_c, ref_r = ref_logps[:b], ref_logps[b:]
    logits = beta * ((chosen - ref_c) - (rejected - ref_r))
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(logits)
    elif loss_type == "ipo":
        losses = (logits / beta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    nll = -(seq[:b].sum() / mask[:b].sum().clamp_min(1))
    loss = losses.mean() + nll_alpha * nll
    rc = beta * (chosen - ref_c).detach()
    rr = beta * (rejected - ref_r).detach()
    metrics = {
        "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
        "rewards/accuracies": (rc > rr).float().mean(), "rewards/margins": (rc - rr).mean(),
        "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean(),
        "nll": nll.detach(),
    }
    return loss, metrics
