"""Backend 'torch': chunked pure torch, runs on CPU and CUDA (see chunked.py)."""

from __future__ import annotations

from torch import Tensor

from ._validation import KDBatch, KDOptions
from .chunked import FusedLinearLogProbs, chunked_topk
from .chunked import fused_linear_kd as _fused


def fused_linear_kd(batch: KDBatch, opts: KDOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, nll_sum, kd_sum), gradients computed chunk by chunk."""
    return _fused(batch, opts)


def linear_log_probs(hidden, weight, bias, labels, temperature, ignore_index, chunk_size) -> Tensor:  # noqa: ANN001
    """Per-token log-probs; the backward recomputes the chunks."""
    return FusedLinearLogProbs.apply(hidden, weight, bias, labels, temperature, ignore_index, chunk_size)


def linear_topk(hidden, weight, bias, k, temperature, chunk_size) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    """Top-k over the full softmax, chunk by chunk."""
    return chunked_topk(hidden, weight, bias, k, temperature, chunk_size)
