"""Fused DPO-family preference loss (+ NLL) on a linear head, chunked by tokens, not by pairs.

Proxy-KD aligns the proxy with L = nll_alpha * NLL(teacher answer) + DPO(chosen = teacher answer,
rejected = proxy sample, reference = previous-round proxy). Rows of `hidden` [2B, T, H] are the B
chosen sequences, then the B rejected ones (TRL / Liger stacking); `labels` [2B, T] are already
shifted, with prompts and padding set to `ignore_index`.

Notation: pi_c, pi_r are the policy's sequence log-probs of the chosen / rejected completion
(sums of token log-probs, or means with `average_log_prob=True`), ref_c, ref_r the reference's,
and h = (pi_c - ref_c) - (pi_r - ref_r). Per-pair losses l_b (TRL's DPOTrainer conventions):

    sigmoid   -(1-ls) logsigmoid(beta h) - ls logsigmoid(-beta h)        (DPO; ls > 0: cDPO)
    robust    [-(1-ls) logsigmoid(beta h) + ls logsigmoid(-beta h)] / (1 - 2 ls)   (Chowdhury et al.)
    hinge     relu(1 - beta h)                                            (SLiC)
    ipo       (h - 1/(2 beta))^2, h from per-token mean log-probs         (IPO, eq. 17)
    apo_zero  1 - sigmoid(beta (pi_c - ref_c)) + sigmoid(beta (pi_r - ref_r))   (APO-zero)

    loss = sum_b w_b l_b / B + nll_alpha * (-sum of chosen token log-probs) / (number of chosen tokens)

With `sample_weight=None` (w = 1) the first term is the plain mean over pairs. Like TRL, `ipo`
always length-normalizes (mean token log-prob per sequence) whatever `average_log_prob` says;
precomputed `ref_logps` must be on the same scale as the policy's (sums, or means for `ipo` /
`average_log_prob=True`), e.g. from `sequence_log_probs(..., average=...)`. A sequence without
any completion token has log-prob 0 (sum or mean); NLL over zero chosen tokens is 0.

How it runs: see _preference.py. On backends with per-token steps (torch, cuda, triton,
triton-chunked) the non-ignored tokens are laid out pair by pair and chunked by tokens, so peak
memory is one [chunk_size, V] fp32 buffer plus dW whatever T is (Liger's per-pair chunk holds
several [2, T, V] fp32 tensors); "reference" and "triton-fused" (whose logits never exist, not
even per chunk) differentiate `linear_log_probs` on the gathered tokens instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._spec import Head
from ._validation import check_chunk_size, check_device, check_floating, check_labels
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
    ref: Tensor  # [2B] fp64 reference log-probs (on the policy's scale)
    weight: Tensor | None  # [B] fp64 pair weights
    denom: Tensor  # [2B] fp64 per-row divisor: token counts (>= 1) when averaging, else ones
    n_chosen: int  # chosen tokens in the whole batch

    def logps(self, sums: Tensor) -> Tensor:
        """Sequence log-probs on the loss's scale (sums, or means when averaging)."""
        return sums / self.denom if self.average else sums

    def pair_terms(self, sum_c: Tensor, sum_r: Tensor, p0: int, p1: int) -> Tensor:
        """w_b l_b / B for pairs p0..p1-1 given their chosen / rejected token log-prob sums."""
        b = self.n_pairs
        if self.average:
            sum_c, sum_r = sum_c / self.denom[p0:p1], sum_r / self.denom[b + p0 : b + p1]
        lc, lr = sum_c - self.ref[p0:p1], sum_r - self.ref[b + p0 : b + p1]
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


def _check_number(name: str, value: float, *, low: float, low_open: bool, high: float = math.inf) -> float:
    """A finite float in the given range, else a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    too_low = v <= low if low_open else v < low
    if not math.isfinite(v) or too_low or v >= high:
        bound = f"> {low}" if low_open else f">= {low}"
        if high != math.inf:
            bound = f"in [{low}, {high})"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return v


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO-family loss (+ nll_alpha * chosen NLL) of a linear head, chunked by tokens; returns (loss, metrics).

    hidden [2B, T, H]: B chosen rows then B rejected rows; labels [2B, T] shifted, prompt/padding =
    ignore_index. Reference: precomputed `ref_logps` [2B] or an online `ref_hidden` [2B, T, Hr] +
    `ref_weight` [V, Hr] (no gradient). `sample_weight` [B] weights pairs: sum_b w_b l_b / B.
    `chunk_size` is tokens per logits chunk. Formulas, scales and metrics: see the module doc;
    metrics are detached scalars (fp32; fp64 for fp64 inputs) under TRL's names (rewards/*, logps/*, nll).
    """
    flat, lead, vocab = check_sequence_head("hidden", hidden, "weight", weight, "bias", bias)
    device = flat.device
    n_rows = lead[0]
    if n_rows == 0 or n_rows % 2:
        raise ValueError(
            f"hidden must stack B chosen rows then B rejected rows (an even, nonzero number of rows), got {n_rows}"
        )
    n_pairs = n_rows // 2
    check_device("labels", labels, device)
    flat_labels = check_labels(labels, lead, vocab, ignore_index)
    ignore_index = int(ignore_index)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    beta = _check_number("beta", beta, low=0.0, low_open=True)
    nll_alpha = _check_number("nll_alpha", nll_alpha, low=0.0, low_open=False)
    label_smoothing = _check_number("label_smoothing", label_smoothing, low=0.0, low_open=False, high=0.5)
    if label_smoothing and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing={label_smoothing} is only defined for loss_type in {SMOOTHED_LOSS_TYPES}, "
            f"got loss_type={loss_type!r}; leave it at 0"
        )
    chunk_size = check_chunk_size(chunk_size)
    impl = resolve(backend, device, flat, weight)
    weights = None if sample_weight is None else _check_pair_vector("sample_weight", sample_weight, n_pairs, "B", device)
    if weights is not None and bool((weights < 0).any()):
        raise ValueError("sample_weight must be >= 0")
    average = bool(average_log_prob) or loss_type == "ipo"

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
        ref_impl = resolve(backend, device, ref_flat, ref_weight)
        ref_sums = ref_impl.sequence_sums(ref_head, flat_labels, plan, lead, ignore_index, chunk_size)
        ref = ref_sums / denom
    else:
        ref = _check_pair_vector("ref_logps", ref_logps, n_rows, "2B", device)

    n_chosen = int(counts[:n_pairs].sum())
    obj = _Objective(beta, loss_type, label_smoothing, nll_alpha, average, n_pairs, ref, weights, denom, n_chosen)
    loss, sums = impl.sequence_loss(Head(flat, weight, bias), flat_labels, plan, lead, ignore_index, chunk_size, obj,
                                    output_dtype(hidden, weight))
    return loss, _metrics(obj, sums, loss.dtype)


@torch.no_grad()
def _metrics(obj: _Objective, sums: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """TRL's detached logging metrics from the row log-prob sums."""
    b = obj.n_pairs
    logps = obj.logps(sums)
    rc = obj.beta * (logps[:b] - obj.ref[:b])
    rr = obj.beta * (logps[b:] - obj.ref[b:])
    values = (rc.mean(), rr.mean(), (rc > rr).double().mean(), (rc - rr).mean(),
              logps[:b].mean(), logps[b:].mean(), obj.nll(sums))
    return {name: v.to(dtype) for name, v in zip(METRIC_NAMES, values)}
