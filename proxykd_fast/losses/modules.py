"""nn.Module forms of the fused losses, for code that wants a loss object with fixed options."""

from __future__ import annotations

from torch import Tensor, nn

from .functional import linear_cross_entropy, proxy_kd_loss


class LinearCrossEntropyLoss(nn.Module):
    """Module form of `linear_cross_entropy`; options fixed at construction."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None,
                 backend: str = "auto", vocab_parallel_group: object = None) -> None:
        super().__init__()
        self.ignore_index, self.reduction, self.chunk_size, self.backend = ignore_index, reduction, chunk_size, backend
        self.vocab_parallel_group = vocab_parallel_group

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                num_items_in_batch: int | float | Tensor | None = None) -> Tensor:
        """Cross-entropy of the linear head over labels."""
        return linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, num_items_in_batch=num_items_in_batch,
                                    chunk_size=self.chunk_size, backend=self.backend,
                                    vocab_parallel_group=self.vocab_parallel_group)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, backend={self.backend!r}"


class ProxyKDLoss(nn.Module):
    """Module form of `proxy_kd_loss`: NLL + alpha * w * T^2 * D(proxy || student)."""

    def __init__(self, *, alpha: float = 1.0, nll_weight: float = 1.0, temperature: float = 1.0,
                 divergence: str = "forward_kl", jsd_beta: float = 0.5, ignore_index: int = -100,
                 reduction: str = "mean", chunk_size: int | None = None, backend: str = "auto",
                 vocab_parallel_group: object = None) -> None:
        super().__init__()
        self.alpha, self.nll_weight, self.temperature = alpha, nll_weight, temperature
        self.vocab_parallel_group = vocab_parallel_group
        self.divergence, self.jsd_beta = divergence, jsd_beta
        self.ignore_index, self.reduction, self.chunk_size, self.backend = ignore_index, reduction, chunk_size, backend

    def forward(self, student_hidden: Tensor, student_weight: Tensor, labels: Tensor, *,
                proxy_hidden: Tensor | None = None, proxy_weight: Tensor | None = None,
                proxy_topk_ids: Tensor | None = None, proxy_topk_logprobs: Tensor | None = None,
                sample_weight: Tensor | None = None, num_items_in_batch: int | float | Tensor | None = None,
                student_bias: Tensor | None = None, proxy_bias: Tensor | None = None) -> Tensor:
        """The Proxy-KD loss for one batch."""
        return proxy_kd_loss(
            student_hidden, student_weight, labels, proxy_hidden=proxy_hidden, proxy_weight=proxy_weight,
            proxy_topk_ids=proxy_topk_ids, proxy_topk_logprobs=proxy_topk_logprobs, sample_weight=sample_weight,
            alpha=self.alpha, nll_weight=self.nll_weight, temperature=self.temperature, divergence=self.divergence,
            jsd_beta=self.jsd_beta,
            ignore_index=self.ignore_index, reduction=self.reduction, num_items_in_batch=num_items_in_batch,
            student_bias=student_bias, proxy_bias=proxy_bias, chunk_size=self.chunk_size, backend=self.backend,
            vocab_parallel_group=self.vocab_parallel_group,
        )

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, nll_weight={self.nll_weight}, temperature={self.temperature}, "
                f"divergence={self.divergence!r}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
