"""Fused DPO-family preference loss (+ NLL) on a linear head, chunked by tokens, not by pairs.

Proxy-KD aligns the proxy with L = nll_alpha * NLL(teacher answer) + DPO(chosen = teacher answer,
rejected = proxy sample, reference = previous-round proxy). Rows of `hidden` [2B, T, H] are the B
chosen sequences, then the B rejected ones (TRL / Liger stacking); `labels` [2B, T] are already
shifted, with prompts and padding set to `ignore_index`.

Notation: pi_c, pi_r are the policy's sequence log-probs of the chosen / rejected completion
(sums of token log-probs, or per-token means with `average_log_prob=True`), ref_c, ref_r the
reference's on the same scale, and h = (pi_c - ref_c) - (pi_r - ref_r). Per-pair losses l_b:

    sigmoid   -(1-ls) logsigmoid(beta h) - ls logsigmoid(-beta h)        (DPO; ls > 0: cDPO)
    robust    [-(1-ls) logsigmoid(beta h) + ls logsigmoid(-beta h)] / (1 - 2 ls)   (Chowdhury et al.)
    hinge     relu(1 - beta h)                                            (SLiC)
    ipo       (h - 1/(2 beta))^2, h from per-token mean log-probs         (IPO, eq. 17)
    apo_zero  1 - sigmoid(beta (pi_c - ref_c)) + sigmoid(beta (pi_r - ref_r))   (APO-zero)

    loss = sum_b w_b l_b / B + nll_alpha * (-sum of chosen token log-probs) / (number of chosen tokens)

With `sample_weight=None` (w = 1) the first term is the plain mean over pairs. Like TRL, `ipo`
always length-normalizes (mean token log-prob per sequence) whatever `average_log_prob` says.
These are TRL 1.16's DPOTrainer formulas, with one documented difference: TRL applies
`label_smoothing` to robust (and EXO) only, while here `sigmoid` with label_smoothing > 0 is
conservative DPO (cDPO, Mitchell 2023), as in TRL before 1.0 and in Liger.

Precomputed `ref_logps` are always **summed** token log-probs over each row's completion tokens
(TRL's `ref_chosen_logps` / `ref_rejected_logps`, `sequence_log_probs`' default): the loss
knows the token counts from the labels and normalizes the reference itself where it must (ipo,
`average_log_prob=True`). A sequence without any completion token has log-prob 0; NLL over zero
chosen tokens is 0. Metrics (detached, under TRL's names) are on TRL's scale: rewards/* =
beta * (sum log-ratio) and logps/* = summed log-probs, for ipo too; with `average_log_prob=True`
they are per-token means instead, the scale that loss then uses (Liger's convention).

How it runs: see _preference.py. On backends with per-token steps (torch, cuda, triton,
triton-chunked) the non-ignored tokens are laid out pair by pair and chunked by tokens, so peak
memory is one [chunk_size, V] fp32 buffer plus dW whatever T is (Liger's per-pair chunk holds
several [2, T, V] fp32 tensors); "reference" and "triton-fused" (whose logits never exist, not
even per chunk) differentiate `linear_log_probs` on the gathered tokens instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._spec import Head
from ._validation import (
    check_chunk_size,
    check_device,
    check_flag,
    check_floating,
    check_real,
    prepare_rows,
)
from ._vocab_parallel import ProcessGroup, compute_dtype, gather_dtensor
from .backends import Backend, resolve
from .sequence import check_sequence_head, output_dtype

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero")
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "nll")


def pair_losses(logratio_c: Tensor, logratio_r: Tensor, beta: float, loss_type: str, label_smoothing: float) -> Tensor:
    """Per-pair preference loss from the chosen / rejected log-ratios log(pi / ref) (see module doc)."""
    h = logratio_c - logratio_r
    ls = label_smoothing
    if loss_type == "sigmoid":
        return -(1.0 - ls) * F.logsigmoid(beta * h) - ls * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1.0 - ls) * F.logsigmoid(beta * h) + ls * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * ls)
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "apo_zero":
        return (1.0 - torch.sigmoid(beta * logratio_c)) + torch.sigmoid(beta * logratio_r)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


@dataclass
class _Objective:
    """The loss as a function of the 2B per-row token log-prob sums (fp64), pairs separable."""

    beta: float
    loss_type: str
    label_smoothing: float
    nll_alpha: float
    average: bool
    n_pairs: int
    ref: Tensor  # [2B] fp64 summed reference log-probs
    weight: Tensor | None  # [B] fp64 pair weights
    denom: Tensor  # [2B] fp64 per-row divisor: token counts (>= 1) when averaging, else ones
    n_chosen: int  # chosen tokens in the whole batch


    def pair_terms(self, sum_c: Tensor, sum_r: Tensor, p0: int, p1: int) -> Tensor:
        """w_b l_b / B for pairs p0..p1-1 given their chosen / rejected token log-prob sums."""
        b = self.n_pairs
        ref_c, ref_r = self.ref[p0:p1], self.ref[b + p0 : b + p1]
        if self.average:
            d_c, d_r = self.denom[p0:p1], self.denom[b + p0 : b + p1]
            sum_c, sum_r, ref_c, ref_r = sum_c / d_c, sum_r / d_r, ref_c / d_c, ref_r / d_r
        lc, lr = sum_c - ref_c, sum_r - ref_r
        losses = pair_losses(lc, lr, self.beta, self.loss_type, self.label_smoothing)
        if self.weight is not None:
            losses = losses * self.weight[p0:p1]
        return losses / b

    def nll(self, sums: Tensor) -> Tensor:
        """Mean NLL over the chosen tokens."""
        return -sums[: self.n_pairs].sum() / max(self.n_chosen, 1)

    def total(self, sums: Tensor) -> Tensor:
        """The scalar loss (differentiable in `sums`)."""
        b = self.n_pairs
        loss = self.pair_terms(sums[:b], sums[b:], 0, b).sum()
        if self.nll_alpha:
            loss = loss + self.nll_alpha * self.nll(sums)
        return loss

    def row_coefficients(self, sums: Tensor, p0: int, p1: int, out: Tensor) -> None:
        """Write d loss / d sums for the chosen and rejected rows of pairs p0..p1-1 into `out` [2B]."""
        b = self.n_pairs
        with torch.enable_grad():
            sc = sums[p0:p1].detach().requires_grad_(True)
            sr = sums[b + p0 : b + p1].detach().requires_grad_(True)
            gc, gr = torch.autograd.grad(self.pair_terms(sc, sr, p0, p1).sum(), (sc, sr))
        out[p0:p1] = gc - self.nll_alpha / max(self.n_chosen, 1)
        out[b + p0 : b + p1] = gr


def _check_pair_vector(name: str, t: Tensor, length: int, what: str, device: torch.device) -> Tensor:
    """A finite floating vector of the given length, detached and in fp64."""
    check_floating(name, t)
    check_device(name, t, device)
    if tuple(t.shape) != (length,):
        raise ValueError(f"{name} must have shape [{what}] = [{length}], got {list(t.shape)}")
    out = t.detach().double()
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return out


def dpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    ref_logps: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    nll_alpha: float = 0.0,
    sample_weight: Tensor | None = None,
    average_log_prob: bool = False,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | Backend = "auto",
    vocab_parallel_group: ProcessGroup | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO-family loss (+ nll_alpha * chosen NLL) of a linear head, chunked by tokens; returns (loss, metrics).

    hidden [2B, T, H]: B chosen rows then B rejected rows; labels [2B, T] shifted, prompt/padding =
    ignore_index. Reference: precomputed `ref_logps` [2B] or an online `ref_hidden` [2B, T, Hr] +
    `ref_weight` [V, Hr] (no gradient). `sample_weight` [B] weights pairs: sum_b w_b l_b / B.
    `chunk_size` is tokens per logits chunk. Formulas, scales and metrics: see the module doc;
    metrics are detached scalars (fp32; fp64 for fp64 inputs) under TRL's names (rewards/*, logps/*, nll).
    `vocab_parallel_group`: weight (bias, ref_weight, ref_bias) are this rank's rows of the head, as in
    proxykd_fast.losses.functional; the loss and metrics are the same on every rank.
    """
    n_rows = hidden.shape[0] if isinstance(hidden, Tensor) and hidden.dim() == 3 else 2
    if n_rows == 0 or n_rows % 2:
        raise ValueError(
            f"hidden must stack B chosen rows then B rejected rows (an even, nonzero number of rows), got {n_rows}"
        )
    head, lead, flat_labels, shard = prepare_rows(hidden, weight, bias, labels, ignore_index, vocab_parallel_group,
                                                  sequences=True)
    flat, weight, bias, vocab = head.hidden, head.weight, head.bias, head.vocab
    device = flat.device
    n_pairs = n_rows // 2
    ignore_index = int(ignore_index)
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    beta = check_real("beta", beta, low=0.0, low_open=True)
    nll_alpha = check_real("nll_alpha", nll_alpha, low=0.0)
    label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    average_log_prob = check_flag("average_log_prob", average_log_prob)
    if label_smoothing and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing={label_smoothing} is only defined for loss_type in {SMOOTHED_LOSS_TYPES}, "
            f"got loss_type={loss_type!r}; leave it at 0"
        )
    chunk_size = check_chunk_size(chunk_size)
    impl = resolve(backend, device, flat, weight, shard=shard)
    weights = None if sample_weight is None else _check_pair_vector("sample_weight", sample_weight, n_pairs, "B", device)
    if weights is not None and bool((weights < 0).any()):
        raise ValueError("sample_weight must be >= 0")
    average = average_log_prob or loss_type == "ipo"

    online = ref_hidden is not None or ref_weight is not None
    if online and ref_logps is not None:
        raise ValueError("give either ref_logps (precomputed) or ref_hidden + ref_weight (online reference), not both")
    if not online and ref_logps is None:
        raise ValueError("a reference is required: pass ref_logps [2B] or ref_hidden [2B, T, Hr] + ref_weight [V, Hr]")
    if ref_bias is not None and not online:
        raise ValueError("ref_bias is only meaningful with an online reference (ref_hidden + ref_weight)")
    counts = torch.bincount((flat_labels != ignore_index).nonzero().view(-1) // lead[1], minlength=n_rows) \
        if lead[1] else torch.zeros(n_rows, dtype=torch.long, device=device)
    denom = counts.clamp_min(1).double() if average else torch.ones(n_rows, dtype=torch.float64, device=device)
    if online:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("an online reference needs both ref_hidden and ref_weight")
        ref_weight = gather_dtensor(ref_weight, compute_dtype(ref_hidden))
        ref_bias = gather_dtensor(ref_bias, compute_dtype(ref_hidden))
        ref_flat, ref_lead, ref_vocab = check_sequence_head("ref_hidden", ref_hidden, "ref_weight", ref_weight,
                                                            "ref_bias", ref_bias, device)
        if ref_lead != lead:
            raise ValueError(f"ref_hidden must have leading shape {list(lead)} like hidden, got {list(ref_lead)}")
        if ref_vocab != vocab:
            raise ValueError(
                f"vocab mismatch: ref_weight has V={ref_vocab} rows but weight has V={vocab}; "
                "policy and reference must share one vocabulary"
            )
    plan = impl.sequence_plan(flat_labels, lead, ignore_index, chunk_size, int(counts.sum()), vocab)
    if online:
        ref_head = Head(ref_flat, ref_weight, ref_bias)
        ref_impl = resolve(backend, device, ref_flat, ref_weight, shard=shard)
        ref = ref_impl.sequence_sums(ref_head, flat_labels, plan, lead, ignore_index, chunk_size, shard)
    else:
        ref = _check_pair_vector("ref_logps", ref_logps, n_rows, "2B", device)

    n_chosen = int(counts[:n_pairs].sum())
    obj = _Objective(beta, loss_type, label_smoothing, nll_alpha, average, n_pairs, ref, weights, denom, n_chosen)
    loss, sums = impl.sequence_loss(Head(flat, weight, bias), flat_labels, plan, lead, ignore_index, chunk_size, obj,
                                    output_dtype(hidden, weight), shard)
    return loss, _metrics(obj, sums, loss.dtype, average_log_prob)


@torch.no_grad()
def _metrics(obj: _Objective, sums: Tensor, dtype: torch.dtype, average: bool) -> dict[str, Tensor]:
    """TRL's detached logging metrics: from summed log-probs (TRL's scale), or means with average_log_prob."""
    b = obj.n_pairs
    logps, ref = (sums / obj.denom, obj.ref / obj.denom) if average else (sums, obj.ref)
    rc = obj.beta * (logps[:b] - ref[:b])
    rr = obj.beta * (logps[b:] - ref[b:])
    values = (rc.mean(), rr.mean(), (rc > rr).double().mean(), (rc - rr).mean(),
              logps[:b].mean(), logps[b:].mean(), obj.nll(sums))
    return {name: v.to(dtype) for name, v in zip(METRIC_NAMES, values)}
