"""Sequence-level log-probabilities of a linear head, computed over non-ignored tokens only.

Preference losses (DPO and friends) and Proxy-KD's sample weights need log p(answer | prompt)
per sequence: the sum (or mean) of the token log-probs over the completion. The helpers here
validate [rows, T, H] inputs; the backend gathers the non-ignored tokens (prompts and padding
cost no GEMM) and reduces per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import (
    check_bias,
    check_chunk_size,
    check_device,
    check_floating,
    check_temperature,
    check_weight,
    prepare_rows,
)
from ._vocab_parallel import ProcessGroup
from .backends import Backend, resolve, token_sums


def check_sequence_head(
    hidden_name: str, hidden: Tensor, weight_name: str, weight: Tensor, bias_name: str, bias: Tensor | None,
    device: torch.device | None = None,
) -> tuple[Tensor, tuple[int, int], int]:
    """Validate a [rows, T, H] hidden with its [V, H] head; return flat [rows*T, H] hidden, (rows, T), V."""
    check_floating(hidden_name, hidden)
    if hidden.dim() != 3:
        raise ValueError(f"{hidden_name} must be [rows, T, H] (one row per sequence), got shape {tuple(hidden.shape)}")
    device = hidden.device if device is None else device
    check_device(hidden_name, hidden, device)
    check_device(weight_name, weight, device)
    vocab = check_weight(weight_name, weight, hidden.shape[2], hidden_name)
    check_bias(bias_name, bias, vocab)
    check_device(bias_name, bias, device)
    rows, t = hidden.shape[0], hidden.shape[1]
    return hidden.reshape(rows * t, hidden.shape[2]), (rows, t), vocab


def output_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64, else fp32 (the dtype of our losses and log-probs)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def sequence_log_probs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    average: bool = False,
    chunk_size: int | None = None,
    backend: str | Backend = "auto",
    vocab_parallel_group: ProcessGroup | None = None,
) -> Tensor:
    """log p(completion) per row: sum (or mean, `average=True`) of token log-probs over non-ignored labels.

    hidden [rows, T, H], labels [rows, T] already shifted; returns [rows] in fp32 (fp64 for fp64
    inputs), differentiable, without [tokens x V] logits. A row with no completion token gets 0.
    Use it for precomputed DPO reference log-probs and for the proxy's likelihood of teacher answers.
    """
    head, lead, flat_labels, shard = prepare_rows(hidden, weight, bias, labels, ignore_index, vocab_parallel_group,
                                                  sequences=True)
    flat = head.hidden
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    impl = resolve(backend, flat.device, flat, head.weight, shard=shard)
    sums, counts = token_sums(impl, head, flat_labels, lead, temperature, int(ignore_index), chunk_size, shard)
    if average:
        sums = sums / counts.clamp_min(1).to(sums.dtype)
    return sums.to(output_dtype(hidden, weight))
