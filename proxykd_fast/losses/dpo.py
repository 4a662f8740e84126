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

How it runs (backends "torch", "cuda", "triton", "triton-chunked"; see _token_rows.py): the
non-ignored tokens are laid out pair by pair and cut into chunks of at most `chunk_size` tokens. Pairs that fit are packed whole into a
chunk, so their sequence log-probs and hence d loss / d logits are known after the chunk's one
logits GEMM: logits -> log-softmax -> dlogits in place -> dX, dW GEMMs (fp32 dW accumulator), as
Liger does per pair, but without the masked prompt/padding tokens. A pair longer than a chunk is
streamed: a forward-only pass gets its sequence log-probs, then a second pass recomputes each chunk
with the now-known coefficients. Peak memory is one [chunk_size, V] fp32 buffer plus dW, whatever
T is (Liger's per-pair chunk holds several [2, T, V] fp32 tensors). The Triton backends run the
chunk's log-prob and dlogits steps in the row-epilogue kernel. "reference" and "triton-fused"
(whose logits never exist, not even per chunk) differentiate `linear_log_probs` on the gathered
tokens instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _backends
from ._gemm import accumulate_grad_weight, default_chunk_rows, grad_input_chunk, logits_into, workspace
from ._token_rows import TokenRows, TorchTokenRows, token_rows_for
from ._validation import check_chunk_size, check_device, check_floating, check_labels
from .sequence import check_sequence_head, output_dtype, token_sums

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


@dataclass
class _Plan:
    """Non-ignored tokens laid out pair by pair (chosen row, then rejected row) and their chunks."""

    idx: Tensor  # [M] int64 flat token positions in [2B*T]
    labels: Tensor  # [M] int64
    row: Tensor  # [M] int64 sequence row in [0, 2B)
    counts: Tensor  # [2B] int64 tokens per row
    chunks: list[tuple[int, int, int, int, bool]]  # (token start, stop, pair start, stop, streamed)
    rows: int  # tokens per chunk
    ops: TokenRows = field(default_factory=TorchTokenRows)  # per-chunk log-prob / dlogits epilogue


def _plan(flat_labels: Tensor, lead: tuple[int, int], ignore_index: int, rows: int,
          ops: TokenRows | None = None) -> _Plan:
    """Order the non-ignored tokens pair-major and cut them into chunks of whole pairs (or stream a long pair)."""
    n_rows, t = lead
    b = n_rows // 2
    valid = (flat_labels != ignore_index).view(n_rows, t)
    order = torch.arange(n_rows, device=valid.device).view(2, b).t().reshape(-1)  # 0, B, 1, B+1, ...
    nz = valid.index_select(0, order).nonzero()
    row = order.index_select(0, nz[:, 0])
    idx = row * t + nz[:, 1]
    counts = valid.sum(1)
    chunks: list[tuple[int, int, int, int, bool]] = []
    pair_tokens = (counts[:b] + counts[b:]).tolist()
    tok = start_tok = start_pair = 0
    for p, n in enumerate(pair_tokens):
        if n > rows:  # stream this pair in token chunks; flush the packed chunk before it
            if tok > start_tok:
                chunks.append((start_tok, tok, start_pair, p, False))
            chunks.extend((s, min(s + rows, tok + n), p, p + 1, True) for s in range(tok, tok + n, rows))
            tok += n
            start_tok, start_pair = tok, p + 1
            continue
        if tok + n - start_tok > rows:
            chunks.append((start_tok, tok, start_pair, p, False))
            start_tok, start_pair = tok, p
        tok += n
    if start_pair < b and tok > start_tok:
        chunks.append((start_tok, tok, start_pair, b, False))
    return _Plan(idx, flat_labels.index_select(0, idx), row, counts, chunks, rows, ops or TorchTokenRows())


def _fused_pass(
    flat_hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan, obj: _Objective | None,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Row log-prob sums [2B] (fp64) and, if asked, dX, dW (fp32/fp64), db of the loss, chunk by chunk.

    Without gradients (`obj` may then be None) every chunk is computed once.
    """
    device, vocab = flat_hidden.device, weight.shape[0]
    acc = torch.float64 if torch.float64 in (flat_hidden.dtype, weight.dtype) else torch.float32
    need_grad = grad_hidden or grad_weight or grad_bias
    n_rows = plan.counts.shape[0]
    sums = torch.zeros(n_rows, dtype=torch.float64, device=device)
    coef = torch.zeros(n_rows, dtype=torch.float64, device=device)
    d_hidden = torch.zeros_like(flat_hidden) if grad_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=device) if grad_weight else None
    d_bias = torch.zeros(vocab, dtype=acc, device=device) if grad_bias else None
    if not plan.chunks:
        return sums, d_hidden, d_weight, d_bias
    rows = max(stop - start for start, stop, *_ in plan.chunks)
    (buf,) = workspace(device, 1, rows, vocab, acc)

    def token_logps(start: int, stop: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Chunk input, labels, rows and token log-probs; leaves the log-softmax in the buffer."""
        x = flat_hidden.index_select(0, plan.idx[start:stop])
        y = plan.labels[start:stop]
        S = logits_into(buf[: stop - start], x, weight, bias)
        return x, y, plan.row[start:stop], plan.ops.logps(S, y)

    streamed = [c for c in plan.chunks if c[4]]
    if need_grad:  # forward-only pass over the long pairs: their coefficients need every token first
        for start, stop, *_ in streamed:
            _, _, r, lp = token_logps(start, stop)
            sums.index_add_(0, r, lp.double())
        for p in sorted({c[2] for c in streamed}):
            obj.row_coefficients(sums, p, p + 1, coef)
    for start, stop, p0, p1, is_streamed in plan.chunks:
        if is_streamed and not need_grad:
            _, _, r, lp = token_logps(start, stop)
            sums.index_add_(0, r, lp.double())
            continue
        x, y, r, lp = token_logps(start, stop)
        S = buf[: stop - start]
        if not is_streamed:
            sums.index_add_(0, r, lp.double())
            if not need_grad:
                continue
            obj.row_coefficients(sums, p0, p1, coef)
        # d loss / d logits = c_row * (onehot(y) - softmax(z)), c_row = d loss / d (row sum)
        c = coef.index_select(0, r).to(acc)
        plan.ops.dlogits(S, y, c)
        if d_hidden is not None:
            d_hidden.index_copy_(0, plan.idx[start:stop], grad_input_chunk(S, weight).to(d_hidden.dtype))
        if d_weight is not None:
            accumulate_grad_weight(d_weight, S, x)
        if d_bias is not None:
            d_bias += S.sum(0)
    return sums, d_hidden, d_weight, d_bias


def _scaled(t: Tensor | None, g: Tensor, dtype: torch.dtype | None) -> Tensor | None:
    """A saved gradient times the upstream scalar, cast to its input's dtype."""
    if t is None:
        return None
    if float(g) != 1.0:
        t = t * g.to(t.dtype)
    return t if dtype is None else t.to(dtype)


class _FusedDPO(torch.autograd.Function):
    """Loss and row log-prob sums; gradients are computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, flat_hidden, weight, bias, plan, obj):  # noqa: ANN001, D102
        gh, gw, gb = ctx.needs_input_grad[:3]
        sums, dh, dw, db = _fused_pass(flat_hidden, weight, bias, plan, obj, gh, gw, gb)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(sums)
        return obj.total(sums).to(output_dtype(flat_hidden, weight)), sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_sums):  # noqa: ANN001, D102
        dh, dw, db = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return _scaled(dh, grad_loss, None), _scaled(dw, grad_loss, w_dtype), _scaled(db, grad_loss, b_dtype), None, None


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
    backend: str = "auto",
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
    impl = _backends.resolve(backend, device)
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
    acc_dtype = torch.float64 if torch.float64 in (flat.dtype, weight.dtype) else torch.float32
    ops = token_rows_for(impl.__name__, acc_dtype)
    plan = None
    if ops is not None:
        rows = chunk_size or default_chunk_rows(device, 1, vocab, max(1, int(counts.sum())))
        plan = _plan(flat_labels, lead, ignore_index, rows, ops)
    if online:
        ref_b = None if ref_bias is None else ref_bias.detach()
        with torch.no_grad():
            if plan is not None:  # same token chunks, forward only
                ref_sums = _fused_pass(ref_flat.detach(), ref_weight.detach(), ref_b, plan, None, False, False, False)[0]
            else:
                ref_sums = token_sums(ref_flat.detach(), ref_weight.detach(), ref_b, flat_labels, lead,
                                      temperature=1.0, ignore_index=ignore_index, chunk_size=chunk_size,
                                      backend=backend)[0]
        ref = ref_sums / denom
    else:
        ref = _check_pair_vector("ref_logps", ref_logps, n_rows, "2B", device)

    n_chosen = int(counts[:n_pairs].sum())
    obj = _Objective(beta, loss_type, label_smoothing, nll_alpha, average, n_pairs, ref, weights, denom, n_chosen)
    if plan is not None:
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (flat, weight, bias)):
            loss, sums = _FusedDPO.apply(flat, weight, bias, plan, obj)
        else:  # no graph: skip the gradient work entirely
            sums = _fused_pass(flat, weight, bias, plan, obj, False, False, False)[0]
            loss = obj.total(sums).to(output_dtype(hidden, weight))
    else:
        sums, _ = token_sums(flat, weight, bias, flat_labels, lead, temperature=1.0, ignore_index=ignore_index,
                             chunk_size=chunk_size, backend=backend)
        loss = obj.total(sums).to(output_dtype(hidden, weight))
        sums = sums.detach()
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
