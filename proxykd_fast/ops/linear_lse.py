"""Launcher of kernels/linear_lse.py: row log-sum-exps of scaled logits, no logits in memory."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from proxykd_fast.kernels.linear_lse import linear_lse_kernel

from .configs import tile_config, vocab_splits
from .runtime import dot_flags


def row_lse(x: Tensor, w: Tensor, b: Tensor | None, scale1: float, scale2: float | None) -> tuple[Tensor, Tensor | None]:
    """Row log-sum-exp of scale1 * z (and of scale2 * z when given) with z = x @ w.T + b."""
    n, h = x.shape
    vocab = w.shape[0]
    cfg = tile_config("lse", w.dtype)
    n_split, per = vocab_splits(n, vocab, cfg, x.device)
    part1 = torch.empty(n_split, n, device=x.device, dtype=torch.float32)
    part2 = torch.empty_like(part1) if scale2 is not None else part1
    linear_lse_kernel[(triton.cdiv(n, cfg.bm), n_split)](
        x, w, x if b is None else b, part1, part2,
        n, vocab, h, x.stride(0), w.stride(0), per, float(scale1), float(scale2 or 1.0),
        HAS_BIAS=b is not None, TWO=scale2 is not None, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
        EVEN_K=h % cfg.bk == 0, **dot_flags(w), num_warps=cfg.warps, num_stages=cfg.stages,
    )
    lse1 = torch.logsumexp(part1, 0)
    return lse1, (torch.logsumexp(part2, 0) if scale2 is not None else None)
