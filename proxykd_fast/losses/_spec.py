"""The data contracts every layer shares: validated inputs, loss options and the epilogue's arguments.

Frozen dataclasses instead of long positional lists: the public losses build them once after
validation, the backends, the chunk engine and the kernel launchers (proxykd_fast.ops) only read
them. Nothing here imports Triton, so CPU-only installs can use the contracts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
# What a row epilogue computes: cross-entropy only, or NLL plus one divergence ("offline" is
# forward KL against stored top-k log-probs).
MODES = ("ce", "offline", *DIVERGENCES)


@dataclass(frozen=True)
class Head:
    """One linear head's operands: hidden [N, H], weight [V, H] and optional bias [V]."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    @property
    def vocab(self) -> int:
        """V, the rows of the head's weight."""
        return self.weight.shape[0]

    def detached(self) -> Head:
        """The same head cut from autograd (a proxy or reference gets no gradient)."""
        return Head(self.hidden.detach(), self.weight.detach(), None if self.bias is None else self.bias.detach())


@dataclass(frozen=True)
class LossSpec:
    """Non-tensor options of one fused loss call, after validation."""

    alpha: float = 0.0
    nll_weight: float = 1.0  # weight of the NLL term (0: KD alone, no label-logit work)
    temperature: float = 1.0
    divergence: str | None = None  # None: plain NLL (cross-entropy), no distillation term
    offline: bool = False  # the divergence is forward KL against stored top-k targets
    jsd_beta: float = 0.5
    ignore_index: int = -100
    reduction: str = "mean"
    denominator: float = 1.0
    chunk_size: int | None = None
    logit_scale: float = 1.0  # CE mode only: the NLL of softmax(logit_scale * z) (tempered log-probs)
    shard: Any = None  # _vocab_parallel.VocabShard: the head's rows are this rank's shard of the vocabulary

    @property
    def mode(self) -> str:
        """The epilogue mode: 'ce', 'offline', 'forward_kl', 'reverse_kl' or 'jsd'."""
        if self.divergence is None:
            return "ce"
        return "offline" if self.offline else self.divergence


@dataclass(frozen=True)
class KDBatch:
    """Flattened, validated tensors of one fused NLL (+ KD) call."""

    student: Head  # hidden [N, Hs], weight [V, Hs]
    labels: Tensor  # [N] int64
    proxy: Head | None = None  # online proxy: hidden [N, Hp], weight [V, Hp], detached
    topk_ids: Tensor | None = None  # offline targets [N, k] int64
    topk_logprobs: Tensor | None = None  # [N, k] fp32
    row_weight: Tensor | None = None  # [N] fp32 sample weights
    lead_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class EpilogueArgs:
    """One chunk's inputs to a row epilogue (see proxykd_fast.losses._epilogue_torch for the contract).

    S, P, R are [C, V] buffers: S and P hold the student and proxy logits (fp32, or fp64 for fp64
    inputs) on entry, R is scratch. `labels` are in range (ignored rows clamped); `c_nll` / `c_kd`
    are the per-row gradient coefficients of the NLL and of the distillation term (0 on ignored
    rows). With `need_grad` the epilogue leaves d loss / d logits in S.
    """

    S: Tensor
    P: Tensor | None
    R: Tensor | None
    labels: Tensor
    topk_ids: Tensor | None
    topk_logprobs: Tensor | None
    c_nll: Tensor
    c_kd: Tensor | None
    need_grad: bool


def accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 when any operand is fp64, else fp32: the dtype logits chunks and dW accumulate in."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


SECOND_ORDER_ERROR = (
    "proxykd_fast's fused losses are not twice differentiable: their gradients come from the fused "
    "kernels, not from autograd, so create_graph=True (double backward, Hessian-vector products) would "
    "be wrong. Use backend='reference' for higher-order derivatives."
)


def first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Mark an autograd.Function backward as first-order: refuse create_graph=True with a clear error.

    torch's once_differentiable only fails once the second derivative is run, and not at all where
    autograd.grad finds no path to the inputs; refusing at the first backward is unambiguous.
    """

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():  # autograd runs a backward in grad mode only under create_graph=True
            raise RuntimeError(SECOND_ORDER_ERROR)
        with torch.no_grad():
            return backward(ctx, *grads)

    return wrapper
