"""Backend 'reference': the materializing oracle (see reference.py)."""

from __future__ import annotations

from torch import Tensor

from ._validation import KDBatch, KDOptions
from .reference import reference_kd, reference_log_probs, reference_topk


def fused_linear_kd(batch: KDBatch, opts: KDOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, nll_sum, kd_sum) with full logits and autograd."""
    return reference_kd(batch, opts)


def linear_log_probs(hidden, weight, bias, labels, temperature, ignore_index, chunk_size) -> Tensor:  # noqa: ANN001
    """Per-token log-probs with full logits."""
    return reference_log_probs(hidden, weight, bias, labels, temperature, ignore_index)


def linear_topk(hidden, weight, bias, k, temperature, chunk_size) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    """Top-k with full logits."""
    return reference_topk(hidden, weight, bias, k, temperature)
