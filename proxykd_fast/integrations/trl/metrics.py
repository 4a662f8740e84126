"""TRL's per-token logging statistics from a linear head, in one no-grad chunked pass over the scored tokens.

SFTTrainer / DPOTrainer log `entropy`, `mean_token_accuracy` and (DPO) `logits/chosen|rejected`
from their fused head; here the same numbers come from one forward GEMM per chunk of scored rows,
with at most `chunk_rows` x V logits alive at a time. Statistics only: nothing here is differentiated.
With `wpo=True` the same pass also gives each token's log p(y) - log sum_v p_v^2 (TRL's WPO weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

CHUNK_BYTES = 64 << 20  # fp32 logits per chunk
TOKEN_METRICS = ("logging_steps", "every_step", "off")


def token_metrics_due(trainer: Any) -> bool:
    """Whether this micro-batch's token statistics are wanted (they cost one no-grad GEMM pass).

    `token_metrics="logging_steps"` (default): only on the optimizer steps that will be logged (and
    always in evaluation), so they are nearly free; "every_step": TRL's behaviour; "off": never.
    """
    policy = getattr(trainer.args, "token_metrics", "logging_steps")
    if policy == "off":
        return False
    if policy == "every_step" or not trainer.model.training:
        return True
    args, state = trainer.args, trainer.state
    if str(getattr(args.logging_strategy, "value", args.logging_strategy)) != "steps":
        return True
    every = args.logging_steps  # a float < 1 is a fraction of the run, as Trainer reads it
    every = max(1, int(every if every >= 1 else math.ceil((state.max_steps or 1) * every)))
    step = state.global_step + 1
    return step % every == 0 or (bool(args.logging_first_step) and state.global_step == 0)


@dataclass
class TokenStats:
    """Per scored token: entropy of softmax(z) (nats), whether the label is the argmax, mean logit over V."""

    entropy: Tensor  # [M] fp32
    is_top1: Tensor  # [M] bool
    mean_logit: Tensor  # [M] fp32
    wpo_logp: Tensor | None = None  # [M] fp32 log p(label) - log sum_v p_v^2, with wpo=True


@torch.no_grad()
def token_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                ignore_index: int = -100, chunk_rows: int | None = None, wpo: bool = False,
                ) -> tuple[TokenStats, Tensor]:
    """Statistics of the rows of hidden [..., H] whose (already shifted) label is not ignored; and their mask."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    mask = labels.reshape(-1) != ignore_index
    x, y = flat[mask].detach(), labels.reshape(-1)[mask]
    w = weight.detach()
    b = None if bias is None else bias.detach().float()
    n, vocab = x.shape[0], w.shape[0]
    rows = chunk_rows or max(1, CHUNK_BYTES // (4 * vocab))
    entropy = torch.empty(n, dtype=torch.float32, device=x.device)
    top1 = torch.empty(n, dtype=torch.bool, device=x.device)
    mean_logit = torch.empty(n, dtype=torch.float32, device=x.device)
    wpo_logp = torch.empty(n, dtype=torch.float32, device=x.device) if wpo else None
    for s in range(0, n, rows):
        z = (x[s : s + rows] @ w.t()).float()
        if b is not None:
            z += b
        mean_logit[s : s + rows] = z.mean(-1)
        top1[s : s + rows] = z.argmax(-1) == y[s : s + rows]
        logp = torch.log_softmax(z, -1)
        entropy[s : s + rows] = -(logp.exp() * logp).sum(-1)
        if wpo_logp is not None:
            label_logp = logp.gather(-1, y[s : s + rows, None]).squeeze(-1)
            wpo_logp[s : s + rows] = label_logp - torch.logsumexp(2.0 * logp, -1)
    return TokenStats(entropy, top1, mean_logit, wpo_logp), mask.view(labels.shape)
