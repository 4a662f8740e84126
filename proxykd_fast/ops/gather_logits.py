"""Launcher of kernels/gather_logits.py: logits at a few columns per row (labels, top-k ids)."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from proxykd_fast.kernels.gather_logits import gather_logits_kernel


def gather_logits(x: Tensor, w: Tensor, b: Tensor | None, cols: Tensor) -> Tensor:
    """fp32 logits z[i, cols[i, j]] for a few columns per row ([N, J])."""
    n, h = x.shape
    j = cols.shape[1]
    out = torch.empty(n, j, device=x.device, dtype=torch.float32)
    if n:
        bh = min(triton.next_power_of_2(h), 128)
        gather_logits_kernel[(n,)](
            x, w, x if b is None else b, cols.contiguous(), out, j, h, x.stride(0), w.stride(0),
            HAS_BIAS=b is not None, JP=triton.next_power_of_2(j), BH=bh, num_warps=4,
        )
    return out
