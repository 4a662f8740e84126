"""The row epilogue in plain torch (every mode, any float dtype), and its per-token form for DPO.

The chunk engine hands over the student logits `S` (and proxy logits `P`) of C rows in fp32
(fp64 for fp64 inputs). `TorchEpilogue` computes the per-row NLL and the T^2-scaled divergence
and, when asked, overwrites `S` with d(loss)/d(logits). Every op writes into a preallocated
buffer so a chunk costs a handful of memory passes on top of its GEMMs. It is the reference
form of the `RowEpilogue` contract the Triton and CUDA epilogues also implement.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._spec import EpilogueArgs, LossSpec
from ._vocab_parallel import VocabShard

ROWDOT_BLOCK = 4096  # columns per partial sum of `rowdot`


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product of two [C, V] tensors, with a [C, ROWDOT_BLOCK] temporary at most.

    Blocked partial sums keep it accurate: a single [1, V] x [V, 1] bmm accumulates serially
    and was measured ~50x less accurate (relative to sum |a*b|), enough to make reverse-KL
    gradients at T=0.5 three times less accurate than plain torch's. A term with a == 0 is 0
    whatever b is (0 log 0 = 0): a vocabulary entry masked with -inf on both sides adds nothing.
    """
    c, v = a.shape
    out = torch.zeros(c, dtype=a.dtype, device=a.device)
    tmp = torch.empty(c, min(v, ROWDOT_BLOCK), dtype=a.dtype, device=a.device)
    for j in range(0, v, ROWDOT_BLOCK):
        w = min(ROWDOT_BLOCK, v - j)
        t = torch.mul(a[:, j : j + w], b[:, j : j + w], out=tmp[:, :w])
        part = t.sum(1)
        if bool(torch.isnan(part).any()):  # 0 * (-inf - -inf): a token both sides mask has no term
            part = t.masked_fill_(a[:, j : j + w] == 0, 0.0).sum(1)
        out += part
    return out


def zero_where_zero(t: Tensor, ref: Tensor) -> Tensor:
    """Set t to 0 wherever ref == 0, in place (a gradient term ref * (...) of a masked token is 0, not NaN).

    Only rows that hold a NaN are touched, so finite inputs take no extra pass.
    """
    rows = torch.isnan(t).any(1).nonzero().view(-1)
    if rows.numel():
        t[rows] = t[rows].masked_fill_(ref[rows] == 0, 0.0)
    return t


class Vocab:
    """Row reductions of a logits chunk over the vocabulary, local or vocab-parallel.

    Without a shard these are the plain torch ops. With a `VocabShard` the chunk holds this rank's
    columns only: row maxima and sums are all-reduced and global ids are mapped to local columns
    (a rank that does not own an id contributes 0), so every rank gets the full-vocabulary result.
    """

    def __init__(self, shard: VocabShard | None = None) -> None:
        self.shard = shard

    def log_softmax_(self, X: Tensor) -> Tensor:
        """X = log softmax(X) over the (full) vocabulary, in place."""
        if self.shard is None:
            return torch.log_softmax(X, 1, out=X)
        m = self.shard.max_(X.max(1).values)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row stays -inf, not NaN
        X.sub_(m[:, None])
        X.sub_(self.shard.sum_(row_sumexp(X)).log()[:, None])
        return X

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """Row-wise dot product over the full vocabulary (see rowdot)."""
        out = rowdot(a, b)
        return out if self.shard is None else self.shard.sum_(out)

    def pick(self, X: Tensor, ids: Tensor) -> Tensor:
        """X[i, ids[i, j]] for global ids [C, J]."""
        if self.shard is None:
            return X.gather(1, ids)
        local, owned = self.shard.localize(ids)
        return self.shard.sum_(torch.where(owned, X.gather(1, local), torch.zeros((), dtype=X.dtype, device=X.device)))

    def scatter_add_(self, X: Tensor, ids: Tensor, values: Tensor) -> None:
        """X[i, ids[i, j]] += values[i, j] for global ids [C, J] (on the owning rank)."""
        if self.shard is None:
            X.scatter_add_(1, ids, values)
            return
        local, owned = self.shard.localize(ids)
        X.scatter_add_(1, local, torch.where(owned, values, torch.zeros_like(values)))

    def subtract_label_grad(self, S: Tensor, labels: Tensor | None, c_nll: Tensor) -> None:
        """Apply the -onehot(y) part of the NLL gradient in place (labels None: no NLL term)."""
        if labels is not None:
            self.scatter_add_(S, labels[:, None], -c_nll[:, None])


def row_sumexp(X: Tensor) -> Tensor:
    """sum_v exp(X[:, v]) with a [C, ROWDOT_BLOCK] temporary at most."""
    c, v = X.shape
    out = torch.zeros(c, dtype=X.dtype, device=X.device)
    tmp = torch.empty(c, min(v, ROWDOT_BLOCK), dtype=X.dtype, device=X.device)
    for j in range(0, v, ROWDOT_BLOCK):
        w = min(ROWDOT_BLOCK, v - j)
        out += torch.exp(X[:, j : j + w], out=tmp[:, :w]).sum(1)
    return out


class TorchEpilogue:
    """The `RowEpilogue` in plain torch: every mode and dtype; needs scratch R for most modes."""

    name = "torch"

    def buffers(self, spec: LossSpec, online: bool, dtype: torch.dtype) -> int:
        """S, then P when online, then R (CE needs S only; offline KD at T=1 needs no R)."""
        if spec.divergence is None:
            return 1
        if not online:
            return 1 if spec.temperature == 1.0 else 2
        return 3

    def __call__(self, args: EpilogueArgs, spec: LossSpec) -> tuple[Tensor, Tensor | None]:
        """(nll [C], kd [C] or None); with args.need_grad, dlogits in args.S."""
        return torch_epilogue(args, spec)


def torch_epilogue(args: EpilogueArgs, spec: LossSpec) -> tuple[Tensor, Tensor | None]:
    """Return (nll [C], kd [C] or None) and, if need_grad, leave dlogits in S (see EpilogueArgs)."""
    S, P, R, labels, c_nll, c_kd, need_grad = args.S, args.P, args.R, args.labels, args.c_nll, args.c_kd, args.need_grad
    vocab = Vocab(spec.shard)
    T = spec.temperature
    div = spec.divergence
    if div is None and spec.logit_scale != 1.0:  # CE of scaled logits (tempered log-probs)
        S.mul_(spec.logit_scale)
        c_nll = c_nll * spec.logit_scale  # d/dz = scale * d/d(scale z)
    vocab.log_softmax_(S)  # S = log q
    nll = -vocab.pick(S, labels[:, None]).view(-1)
    if div is None:
        if need_grad:
            S.exp_().mul_(c_nll[:, None])
            vocab.subtract_label_grad(S, labels, c_nll)
        return nll, None
    if spec.nll_weight == 0.0:  # KD alone: the NLL term's -onehot(y) gradient is all zeros
        labels = None

    if args.topk_ids is not None:
        return nll, _offline_forward_kl(vocab, S, R, args.topk_ids, args.topk_logprobs, labels, c_nll, c_kd, T,
                                        need_grad)

    assert P is not None and R is not None
    if T != 1.0:
        P.mul_(1.0 / T)
    vocab.log_softmax_(P)  # P = log p
    if div == "forward_kl" and T == 1.0:
        return nll, _forward_kl_t1(vocab, S, P, R, labels, c_nll, c_kd, need_grad)

    torch.mul(S, 1.0 / T, out=R)
    vocab.log_softmax_(R)  # R = log q_T
    if div == "forward_kl":
        kd = _forward_kl(vocab, S, P, R, labels, c_nll, c_kd, T, need_grad)
    elif div == "reverse_kl":
        kd = _reverse_kl(vocab, S, P, R, labels, c_nll, c_kd, T, need_grad)
    else:
        kd = _jsd(vocab, S, P, R, labels, c_nll, c_kd, T, spec.jsd_beta, need_grad)
    return nll, kd * (T * T)


def _forward_kl_t1(vocab: Vocab, S: Tensor, P: Tensor, R: Tensor, labels: Tensor | None, c_nll: Tensor,
                   c_kd: Tensor, need_grad: bool) -> Tensor:
    """KL(p||q) at T=1, the hot path: dlogits = (c_nll + c_kd) q - c_kd p - c_nll onehot."""
    torch.exp(P, out=R)  # R = p
    P.sub_(S)  # P = log p - log q
    kd = vocab.dot(R, P)
    if need_grad:
        S.exp_().mul_((c_nll + c_kd)[:, None])
        S.addcmul_(R, (-c_kd)[:, None])
        vocab.subtract_label_grad(S, labels, c_nll)
    return kd


def _forward_kl(vocab: Vocab, S: Tensor, P: Tensor, R: Tensor, labels: Tensor | None, c_nll: Tensor, c_kd: Tensor,
                T: float, need_grad: bool) -> Tensor:
    """KL(p||q_T); d(T^2 KL)/ds = T (q_T - p)."""
    torch.sub(P, R, out=R)  # R = log p - log q_T
    P.exp_()  # P = p
    kd = vocab.dot(P, R)
    if need_grad:
        torch.mul(S, 1.0 / T, out=R)  # recompute log q_T from log q (shift invariant)
        vocab.log_softmax_(R)
        R.exp_().sub_(P)  # R = q_T - p
        S.exp_().mul_(c_nll[:, None])
        S.addcmul_(R, (c_kd * T)[:, None])
        vocab.subtract_label_grad(S, labels, c_nll)
    return kd


def _reverse_kl(vocab: Vocab, S: Tensor, P: Tensor, R: Tensor, labels: Tensor | None, c_nll: Tensor, c_kd: Tensor,
                T: float, need_grad: bool) -> Tensor:
    """KL(q_T||p); d(T^2 KL)/ds = T q_T (log q_T - log p - KL)."""
    torch.sub(R, P, out=P)  # P = log q_T - log p
    R.exp_()  # R = q_T
    kd = vocab.dot(R, P)
    if need_grad:
        zero_where_zero(P.sub_(kd[:, None]).mul_(R), R)
        S.exp_().mul_(c_nll[:, None])
        S.addcmul_(P, (c_kd * T)[:, None])
        vocab.subtract_label_grad(S, labels, c_nll)
    return kd


JSD_ROW_SLICES = 8  # the JSD needs a few [rows, V] temporaries: take them 1/8 of a chunk at a time


def _jsd(vocab: Vocab, S: Tensor, P: Tensor, R: Tensor, labels: Tensor | None, c_nll: Tensor, c_kd: Tensor,
         T: float, beta: float, need_grad: bool) -> Tensor:
    """Generalized JSD b KL(p||m) + (1-b) KL(q_T||m), m = b p + (1-b) q_T, in log space.

    Rows are independent, so the temporaries (log m, p, q_T) are taken over row slices of the
    chunk: they add at most ~3/8 of one [C, V] buffer to the declared scratch.
    """
    rows = S.shape[0]
    step = max(1, -(-rows // JSD_ROW_SLICES))
    parts = [_jsd_rows(vocab, S[i : i + step], P[i : i + step], R[i : i + step],
                       None if labels is None else labels[i : i + step], c_nll[i : i + step], c_kd[i : i + step],
                       T, beta, need_grad) for i in range(0, rows, step)]
    return torch.cat(parts) if len(parts) != 1 else parts[0]


def _jsd_rows(vocab: Vocab, S: Tensor, P: Tensor, R: Tensor, labels: Tensor | None, c_nll: Tensor, c_kd: Tensor,
              T: float, beta: float, need_grad: bool) -> Tensor:
    """`_jsd` on a slice of rows (P = log p, R = log q_T on entry)."""
    log_m = torch.logaddexp(P + math.log(beta), R + math.log1p(-beta))
    p = torch.exp(P)
    P.sub_(log_m)  # log p - log m
    kd = beta * vocab.dot(p, P)
    del p
    q_t = torch.exp(R)
    R.sub_(log_m)  # log q_T - log m
    del log_m
    kd = kd + (1.0 - beta) * vocab.dot(q_t, R)
    if need_grad:
        # d/du = q_T * (g - <q_T, g>), g = (1-b)(log q_T - log m)
        R.mul_(1.0 - beta)
        zero_where_zero(R.sub_(vocab.dot(q_t, R)[:, None]).mul_(q_t), q_t)
        S.exp_().mul_(c_nll[:, None])
        S.addcmul_(R, (c_kd * T)[:, None])
        vocab.subtract_label_grad(S, labels, c_nll)
    return kd


def _offline_forward_kl(
    vocab: Vocab,
    S: Tensor,
    R: Tensor | None,
    ids: Tensor,
    lps: Tensor,
    labels: Tensor | None,
    c_nll: Tensor,
    c_kd: Tensor,
    T: float,
    need_grad: bool,
) -> Tensor:
    """T^2 KL(p_topk || q_T) with p the renormalized softmax of the stored top-k log-probs."""
    log_p = torch.log_softmax(lps * (1.0 / T), dim=1)
    finite_row = torch.isfinite(log_p).any(dim=1, keepdim=True)
    p = torch.where(finite_row, log_p.exp(), torch.zeros_like(log_p))  # all -inf rows carry no mass
    if T == 1.0:
        log_qt = S
    else:
        assert R is not None
        torch.mul(S, 1.0 / T, out=R)
        vocab.log_softmax_(R)
        log_qt = R
    terms = p * (log_p - vocab.pick(log_qt, ids))
    kd = torch.where(p > 0, terms, torch.zeros_like(terms)).sum(1)
    if need_grad:
        c_t = c_kd * T * finite_row.view(-1)  # a row whose targets carry no mass has no KD gradient
        c_kd = c_kd * finite_row.view(-1)
        if T == 1.0:
            S.exp_().mul_((c_nll + c_kd)[:, None])
        else:
            R.exp_()
            S.exp_().mul_(c_nll[:, None])
            S.addcmul_(R, c_t[:, None])
        vocab.scatter_add_(S, ids, p * (-c_t)[:, None])
        vocab.subtract_label_grad(S, labels, c_nll)
    return kd * (T * T)


class TorchTokenRows:
    """Per-token steps of a sequence-level loss (DPO) in plain torch: log-softmax in place, then dlogits."""

    def __init__(self, shard: VocabShard | None = None) -> None:
        self.vocab = Vocab(shard)

    def logps(self, S: Tensor, labels: Tensor) -> Tensor:
        """Leave log softmax(S) in S and gather the labels' entries."""
        self.vocab.log_softmax_(S)
        return self.vocab.pick(S, labels[:, None]).view(-1)

    def dlogits(self, S: Tensor, labels: Tensor, coef: Tensor) -> None:
        """S holds log-probs: S = coef * (onehot - exp(S))."""
        S.exp_().mul_((-coef)[:, None])
        self.vocab.scatter_add_(S, labels[:, None], coef[:, None])
