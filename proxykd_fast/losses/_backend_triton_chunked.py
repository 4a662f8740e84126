"""Backend 'triton-chunked': cuBLAS logits per row chunk, one Triton epilogue kernel per chunk.

The speed path: the chunk driver (chunked.run_chunks) does the student / proxy GEMMs, dX and
the fp32 dW; the Triton epilogue turns each chunk's logits into losses and dlogits in 2-3
streaming passes. Top-k uses the streaming tile kernel (it never needs the logits at all).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import chunked
from ._backend_triton_fused import linear_topk
from ._epilogue_triton import scaled_ce_epilogue, triton_epilogue, unavailable_reason
from ._validation import KDBatch, KDOptions

__all__ = ["fused_linear_kd", "linear_log_probs", "linear_topk", "unavailable_reason"]


def fused_linear_kd(batch: KDBatch, opts: KDOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, nll_sum, kd_sum) through the chunk driver with the Triton epilogue."""
    return chunked.fused_linear_kd(batch, opts, epilogue=triton_epilogue)


def linear_log_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                     ignore_index: int, chunk_size: int | None) -> Tensor:
    """Tempered log-probs as minus a per-row CE on z/T (the epilogue applies the 1/T chain rule)."""
    if torch.float64 in (hidden.dtype, weight.dtype):
        return chunked.FusedLinearLogProbs.apply(hidden, weight, bias, labels, temperature, ignore_index, chunk_size)
    opts = KDOptions(ignore_index=ignore_index, reduction="none", chunk_size=chunk_size)
    rows, _, _ = chunked.FusedLinearKD.apply(hidden, weight, bias, labels, None, None, None, None, None, None,
                                             opts, scaled_ce_epilogue(1.0 / temperature))
    return -rows
