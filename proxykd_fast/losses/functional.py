"""Public functional losses: fused linear head + loss without the [tokens x vocab] logits.

Each function validates its arguments (_validation), resolves a backend (backends.resolve) and
calls one of the backend's methods; none of them branches on the backend.

Distributed heads, two ways:
- `vocab_parallel_group`: `weight` (and `bias`, and an online `proxy_weight`) are this rank's
  contiguous shard of the head's rows, in rank order (shards may differ in size); hidden states,
  labels and targets are the same on every rank, labels and top-k ids global. Every rank gets the
  unsharded result; the hidden's gradient is the full gradient, each weight shard's gradient its
  rows of the full one. Per chunk only per-row statistics are all-reduced, never logits: bytes
  per token and call (fp32) are 12 for CE and log-probs (row max, sum-exp, label logit), 12 + 4
  with entropy, about 36 for online KD (max and sum-exp of student at 1 and 1/T and of the
  proxy, the label logit, the divergence's partial sums; reverse KL / JSD add one more), 12 + 4k
  for offline top-k KD (20 + 4k at T != 1), 8 + 12 k x ranks for top-k (the candidates), plus 4 H per token for the
  hidden's gradient, all-reduced once per pass. The row kernels of the Triton / CUDA backends
  finish a row in one launch, so vocab-parallel calls run the chunk engine with the torch epilogue.
- A DTensor weight (an FSDP2-sharded `lm_head.weight`, or a tied embedding, read outside the
  module's forward) is gathered once per call, never per chunk, cast to the hidden states'
  (compute) dtype before the all-gather rather than used as the fp32 master, and its gradient is
  reduce-scattered back onto the sharded parameter (averaged over ranks, as FSDP2 does). This is
  the default for FSDP2 because its ranks hold different tokens: vocab-parallel needs the same
  tokens on every rank of the group (tensor parallelism), so under FSDP the caller would first
  all-gather every rank's hidden states and labels and pass `weight.to_local()` (FSDP2's dim-0
  shard is a contiguous row shard) with the group. That sends about (ranks - 1) N H (b + 8) bytes per
  rank against the gather's 2 (ranks - 1) / ranks V H b (b bytes per element), so it wins while
  N x ranks < ~0.67 V in fp32 (0.4 V in bf16), and it never holds the full head and its fp32
  gradient. Measured (`benchmarks/fsdp_head.py`, 2 gloo ranks, N=2048 per rank, H=1024, V=32000,
  fp32, 2-core CPU): CE 3.82 s / 695 MB / 131 MB sent with the gather, 3.57 s / 424 MB / 25 MB
  vocab-parallel. The gather stays the default because it needs nothing from the caller (any loss,
  any reduction, each rank its own tokens), and inside a wrapped module's forward (the pipeline,
  `fuse_lm_head`) FSDP2 has gathered the head already, so the loss adds no communication at all;
  with a large vocabulary and small per-rank batches, call the vocab-parallel form as above.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import (
    check_chunk_size,
    check_flag,
    check_int,
    check_temperature,
    prepare_ce,
    prepare_head,
    prepare_kd,
    prepare_rows,
    prepare_shard,
)
from ._vocab_parallel import ProcessGroup, compute_dtype, gather_dtensor
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
    vocab_parallel_group: ProcessGroup | None = None,
) -> Tensor:
    """Cross-entropy of softmax(hidden @ weight.T + bias) against labels (already shifted).

    `mean` divides by `num_items_in_batch` when given (exact gradient accumulation), else by
    the number of non-ignored rows; `none` returns one value per row in the labels' shape.
    `vocab_parallel_group`: see the module doc; `weight` may also be an FSDP2 / DTensor weight.
    """
    batch, spec = prepare_ce(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
                             num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
                             vocab_parallel_group=vocab_parallel_group)
    s = batch.student
    loss, _, _ = resolve(backend, s.hidden.device, s.hidden, s.weight, shard=spec.shard).kd(batch, spec)
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
    nll_weight: float = 1.0,
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
    vocab_parallel_group: ProcessGroup | None = None,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Proxy-KD loss: nll_weight * sum_i NLL_i + alpha * sum_i w_i * T^2 * D(p_i, q_i) over non-ignored rows.

    The proxy is online (`proxy_hidden` + `proxy_weight`, no gradient) or offline
    (`proxy_topk_ids` + `proxy_topk_logprobs`, renormalized over the k entries). `nll_weight=0`
    is KD alone (GKD / TRL distillation): the NLL adds nothing to the loss or its gradient (its
    value, one logit per row, is still reported). `temperature` is at most 100 (beyond it T^2 * KD
    has no fp32 precision left). With `return_components=True` also returns detached sums
    {"nll", "kd", "valid_tokens"} (unweighted) for logging. Not twice differentiable.
    """
    student_weight = gather_dtensor(student_weight, compute_dtype(student_hidden))
    student_bias = gather_dtensor(student_bias, compute_dtype(student_hidden))
    proxy_weight = gather_dtensor(proxy_weight, compute_dtype(proxy_hidden))
    proxy_bias = gather_dtensor(proxy_bias, compute_dtype(proxy_hidden))
    batch, spec = prepare_kd(
        student_hidden, student_weight, labels, proxy_hidden=proxy_hidden, proxy_weight=proxy_weight,
        proxy_topk_ids=proxy_topk_ids, proxy_topk_logprobs=proxy_topk_logprobs, sample_weight=sample_weight,
        alpha=alpha, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta,
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        student_bias=student_bias, proxy_bias=proxy_bias, chunk_size=chunk_size, nll_weight=nll_weight,
        vocab_parallel_group=vocab_parallel_group,
    )
    s, p = batch.student, batch.proxy
    impl = resolve(backend, s.hidden.device, s.hidden, s.weight, *((p.hidden, p.weight) if p is not None else ()),
                   shard=spec.shard)
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
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str | Backend = "auto",
    vocab_parallel_group: ProcessGroup | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log softmax(z/T)[label], shaped like labels, 0 on ignored rows; differentiable.

    With `return_entropy=True` returns (log_probs, entropy), the entropy -sum_v q_v log q_v of
    q = softmax(z/T) per token (0 on ignored rows); both take any upstream gradient, the contract
    of per-token primitives trainers such as GRPO / KTO reduce themselves. Not twice differentiable.
    """
    head, lead, flat_labels, shard = prepare_rows(hidden, weight, bias, labels, ignore_index, vocab_parallel_group)
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    return_entropy = check_flag("return_entropy", return_entropy)
    impl = resolve(backend, head.hidden.device, head.hidden, head.weight, shard=shard)
    if return_entropy:
        logp, entropy = impl.log_probs_entropy(head, flat_labels, temperature, int(ignore_index), chunk_size, shard)
        return logp.view(lead), entropy.view(lead)
    return impl.log_probs(head, flat_labels, temperature, int(ignore_index), chunk_size, shard).view(lead)


def linear_topk(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str | Backend = "auto",
    vocab_parallel_group: ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k ids (int64) and log-probs (fp32) of softmax(z/T) over the full vocab, no grad.

    Shapes are [*lead, k] for hidden [*lead, H]; the logits never exist beyond a chunk. With a
    vocab-parallel group the ids are global and every rank returns the same result.
    """
    with torch.no_grad():
        head, lead = prepare_head("hidden", hidden, "weight", gather_dtensor(weight, compute_dtype(hidden)), "bias",
                                  gather_dtensor(bias, compute_dtype(hidden)))
    shard = prepare_shard(vocab_parallel_group, head)
    vocab = head.vocab if shard is None else shard.vocab
    k = check_int("k", k)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V={vocab}], got {k}")
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    impl = resolve(backend, head.hidden.device, head.hidden, head.weight, shard=shard)
    with torch.no_grad():
        ids, lps = impl.topk(head.detached(), k, temperature, chunk_size, shard)
    return ids.view(*lead, k), lps.view(*lead, k)
