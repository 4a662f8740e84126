"""Public functional losses: fused linear head + loss without the [tokens x vocab] logits.

Each function validates its arguments (_validation), resolves a backend (backends.resolve) and
calls one of the backend's methods; none of them branches on the backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_chunk_size, check_temperature, prepare_ce, prepare_head, prepare_kd, prepare_labels
from .backends import Backend, resolve


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
    backend: str | Backend = "auto",
) -> Tensor:
    """Cross-entropy of softmax(hidden @ weight.T + bias) against labels (already shifted).

    `mean` divides by `num_items_in_batch` when given (exact gradient accumulation), else by
    the number of non-ignored rows; `none` returns one value per row in the labels' shape.
    """
    batch, spec = prepare_ce(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
                             num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)
    s = batch.student
    loss, _, _ = resolve(backend, s.hidden.device, s.hidden, s.weight).kd(batch, spec)
    return loss.view(batch.lead_shape) if spec.reduction == "none" else loss


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
    backend: str | Backend = "auto",
    return_components: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Proxy-KD loss: sum_i NLL_i + alpha * sum_i w_i * T^2 * D(p_i, q_i) over non-ignored rows.

    The proxy is online (`proxy_hidden` + `proxy_weight`, no gradient) or offline
    (`proxy_topk_ids` + `proxy_topk_logprobs`, renormalized over the k entries). With
    `return_components=True` also returns detached sums {"nll", "kd", "valid_tokens"} for logging.
    """
    batch, spec = prepare_kd(
        student_hidden, student_weight, labels, proxy_hidden=proxy_hidden, proxy_weight=proxy_weight,
        proxy_topk_ids=proxy_topk_ids, proxy_topk_logprobs=proxy_topk_logprobs, sample_weight=sample_weight,
        alpha=alpha, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta,
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        student_bias=student_bias, proxy_bias=proxy_bias, chunk_size=chunk_size,
    )
    s, p = batch.student, batch.proxy
    impl = resolve(backend, s.hidden.device, s.hidden, s.weight, *((p.hidden, p.weight) if p is not None else ()))
    loss, nll_sum, kd_sum = impl.kd(batch, spec)
    if spec.reduction == "none":
        loss = loss.view(batch.lead_shape)
    if not return_components:
        return loss
    valid = (batch.labels != spec.ignore_index).sum()
    return loss, {"nll": nll_sum, "kd": kd_sum, "valid_tokens": valid}


def linear_log_probs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str | Backend = "auto",
) -> Tensor:
    """Per-token log softmax(z/T)[label], shaped like labels, 0 on ignored rows; differentiable."""
    head, lead = prepare_head("hidden", hidden, "weight", weight, "bias", bias)
    flat_labels = prepare_labels(labels, head, lead, ignore_index)
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    impl = resolve(backend, head.hidden.device, head.hidden, head.weight)
    return impl.log_probs(head, flat_labels, temperature, int(ignore_index), chunk_size).view(lead)


def linear_topk(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str | Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """Top-k ids (int64) and log-probs (fp32) of softmax(z/T) over the full vocab, no grad.

    Shapes are [*lead, k] for hidden [*lead, H]; the logits never exist beyond a chunk.
    """
    head, lead = prepare_head("hidden", hidden, "weight", weight, "bias", bias)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= head.vocab:
        raise ValueError(f"k must be in [1, V={head.vocab}], got {k}")
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    impl = resolve(backend, head.hidden.device, head.hidden, head.weight)
    with torch.no_grad():
        ids, lps = impl.topk(head.detached(), k, temperature, chunk_size)
    return ids.view(*lead, k), lps.view(*lead, k)
