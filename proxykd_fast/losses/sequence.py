"""Sequence-level log-probabilities of a linear head, computed over non-ignored tokens only.

Preference losses (DPO and friends) and Proxy-KD's sample weights need log p(answer | prompt)
per sequence: the sum (or mean) of the token log-probs over the completion. The helpers here
validate [rows, T, H] inputs, gather the non-ignored tokens (prompts and padding cost no GEMM)
and reduce per row, on top of `linear_log_probs` so every backend is available.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_bias, check_device, check_floating, check_labels, check_weight
from .functional import linear_log_probs


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


def token_sums(
    flat_hidden: Tensor, weight: Tensor, bias: Tensor | None, flat_labels: Tensor, lead: tuple[int, int], *,
    temperature: float, ignore_index: int, chunk_size: int | None, backend: str,
) -> tuple[Tensor, Tensor]:
    """(per-row sum of token log-probs in fp64, per-row count of non-ignored tokens); differentiable.

    Only the non-ignored tokens are gathered and sent through `linear_log_probs`.
    """
    rows, t = lead
    idx = (flat_labels != ignore_index).nonzero().view(-1)
    row_of = torch.div(idx, t, rounding_mode="floor") if t else idx
    every = idx.numel() == flat_labels.numel()  # nothing to skip: no gathered copy
    lp = linear_log_probs(
        flat_hidden if every else flat_hidden.index_select(0, idx), weight,
        flat_labels if every else flat_labels.index_select(0, idx), bias=bias,
        temperature=temperature, ignore_index=ignore_index, chunk_size=chunk_size, backend=backend,
    )
    sums = torch.zeros(rows, dtype=torch.float64, device=flat_hidden.device).index_add(0, row_of, lp.double())
    counts = torch.bincount(row_of, minlength=rows)
    return sums, counts


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
    backend: str = "auto",
) -> Tensor:
    """log p(completion) per row: sum (or mean, `average=True`) of token log-probs over non-ignored labels.

    hidden [rows, T, H], labels [rows, T] already shifted; returns [rows] in fp32 (fp64 for fp64
    inputs), differentiable, without [tokens x V] logits. A row with no completion token gets 0.
    Use it for precomputed DPO reference log-probs and for the proxy's likelihood of teacher answers.
    """
    flat, lead, vocab = check_sequence_head("hidden", hidden, "weight", weight, "bias", bias)
    check_device("labels", labels, flat.device)
    flat_labels = check_labels(labels, lead, vocab, ignore_index)
    sums, counts = token_sums(flat, weight, bias, flat_labels, lead, temperature=temperature,
                              ignore_index=int(ignore_index), chunk_size=chunk_size, backend=backend)
    if average:
        sums = sums / counts.clamp_min(1).to(sums.dtype)
    return sums.to(output_dtype(hidden, weight))
