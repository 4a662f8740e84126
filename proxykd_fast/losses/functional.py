"""Public functional losses: fused linear head + loss without the [tokens x vocab] logits."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backends
from ._validation import (
    check_bias,
    check_chunk_size,
    check_device,
    check_labels,
    check_temperature,
    check_weight,
    flatten_hidden,
    prepare_kd,
)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Cross-entropy of softmax(hidden @ weight.T + bias) against labels (already shifted).

    `mean` divides by `num_items_in_batch` when given (exact gradient accumulation), else by
    the number of non-ignored rows; `none` returns one value per row in the labels' shape.
    """
    batch, opts = prepare_kd(
        hidden, weight, labels, proxy_hidden=None, proxy_weight=None, proxy_topk_ids=None,
        proxy_topk_logprobs=None, sample_weight=None, alpha=0.0, temperature=1.0, divergence=None,
        jsd_beta=0.5, ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        student_bias=bias, proxy_bias=None, chunk_size=chunk_size,
    )
    loss, _, _ = _backends.resolve(backend, batch.student_hidden.device).fused_linear_kd(batch, opts)
    return loss.view(batch.lead_shape) if opts.reduction == "none" else loss


def proxy_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    *,
    proxy_hidden: Tensor | None = None,
    proxy_weight: Tensor | None = None,
    proxy_topk_ids: Tensor | None = None,
    proxy_topk_logprobs: Tensor | None = None,
    sample_weight: Tensor | None = None,
    alpha: float = 1.0,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | Tensor | None = None,
    student_bias: Tensor | None = None,
    proxy_bias: Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    return_components: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Proxy-KD loss: sum_i NLL_i + alpha * sum_i w_i * T^2 * D(p_i, q_i) over non-ignored rows.

    The proxy is online (`proxy_hidden` + `proxy_weight`, no gradient) or offline
    (`proxy_topk_ids` + `proxy_topk_logprobs`, renormalized over the k entries). With
    `return_components=True` also returns detached sums {"nll", "kd", "valid_tokens"} for logging.
    """
    batch, opts = prepare_kd(
        student_hidden, student_weight, labels, proxy_hidden=proxy_hidden, proxy_weight=proxy_weight,
        proxy_topk_ids=proxy_topk_ids, proxy_topk_logprobs=proxy_topk_logprobs, sample_weight=sample_weight,
        alpha=alpha, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta,
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        student_bias=student_bias, proxy_bias=proxy_bias, chunk_size=chunk_size,
    )
    loss, nll_sum, kd_sum = _backends.resolve(backend, batch.student_hidden.device).fused_linear_kd(batch, opts)
    if opts.reduction == "none":
        loss = loss.view(batch.lead_shape)
    if not return_components:
        return loss
    valid = (batch.labels != opts.ignore_index).sum()
    return loss, {"nll": nll_sum, "kd": kd_sum, "valid_tokens": valid}


def _prepare_head(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, tuple[int, ...], int]:
    """Validate hidden/weight/bias of a single head; return flat hidden, leading shape and V."""
    flat, lead = flatten_hidden("hidden", hidden)
    check_device("weight", weight, flat.device)
    vocab = check_weight("weight", weight, flat.shape[1], "hidden")
    check_bias("bias", bias, vocab)
    check_device("bias", bias, flat.device)
    return flat, lead, vocab


def linear_log_probs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Per-token log softmax(z/T)[label], shaped like labels, 0 on ignored rows; differentiable."""
    flat, lead, vocab = _prepare_head(hidden, weight, bias)
    check_device("labels", labels, flat.device)
    flat_labels = check_labels(labels, lead, vocab, ignore_index)
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    impl = _backends.resolve(backend, flat.device)
    out = impl.linear_log_probs(flat, weight, bias, flat_labels, temperature, int(ignore_index), chunk_size)
    return out.view(lead)


def linear_topk(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Top-k ids (int64) and log-probs (fp32) of softmax(z/T) over the full vocab, no grad.

    Shapes are [*lead, k] for hidden [*lead, H]; the logits never exist beyond a chunk.
    """
    flat, lead, vocab = _prepare_head(hidden, weight, bias)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V={vocab}], got {k}")
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    impl = _backends.resolve(backend, flat.device)
    with torch.no_grad():
        ids, lps = impl.linear_topk(flat.detach(), weight.detach(), None if bias is None else bias.detach(),
                                    k, temperature, chunk_size)
    return ids.view(*lead, k), lps.view(*lead, k)
