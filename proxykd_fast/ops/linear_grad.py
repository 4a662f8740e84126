"""Launcher of kernels/linear_grad.py: dX / dW / db from recomputed logits tiles (fp32 atomics)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from proxykd_fast.kernels.linear_grad import linear_grad_kernel

from .configs import tile_config
from .runtime import dot_flags


@dataclass(frozen=True)
class GradTerms:
    """dz = coef_a * softmax(scale1 z) + coef_b * softmax(scale2 z) + sum_j sp_coef_j onehot(sp_cols_j).

    lse1 / lse2 are the saved row log-sum-exps of scale1 z / scale2 z; the second softmax term
    is absent when scale2 is None.
    """

    lse1: Tensor  # [N] fp32
    coef_a: Tensor  # [N]
    sp_cols: Tensor  # [N, J] int64
    sp_coef: Tensor  # [N, J]
    scale1: float = 1.0
    lse2: Tensor | None = None
    coef_b: Tensor | None = None
    scale2: float | None = None


def tile_grad(x: Tensor, w: Tensor, b: Tensor | None, terms: GradTerms, need: tuple[bool, bool, bool],
              skip_eps: float = 0.0) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """fp32 (dX, dW, db) of sum_ij dz_ij z_ij; tiles with max |dz| <= skip_eps are skipped (0: exact)."""
    n, h = x.shape
    vocab = w.shape[0]
    need_dx, need_dw, need_db = need[0], need[1], need[2] and b is not None
    dx = torch.zeros(n, h, device=x.device, dtype=torch.float32) if need_dx else None
    dw = torch.zeros(vocab, h, device=x.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros(vocab, device=x.device, dtype=torch.float32) if need_db else None
    if n == 0 or not (need_dx or need_dw or need_db):
        return dx, dw, db
    cfg = tile_config("grad", w.dtype)
    two = terms.scale2 is not None
    f32 = terms.lse1
    grid = (triton.cdiv(n, cfg.bm) * triton.cdiv(vocab, cfg.bn),)
    linear_grad_kernel[grid](
        x, w, x if b is None else b, terms.lse1, terms.lse2 if two else terms.lse1, terms.coef_a.contiguous(),
        terms.coef_b.contiguous() if two else terms.coef_a, terms.sp_cols.contiguous(), terms.sp_coef.contiguous(),
        terms.sp_cols.shape[1],
        f32 if dx is None else dx, f32 if dw is None else dw, f32 if db is None else db,
        n, vocab, h, x.stride(0), w.stride(0), float(terms.scale1), float(terms.scale2 or 1.0), float(skip_eps),
        HAS_BIAS=b is not None, TWO=two, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
        SKIP=skip_eps > 0.0, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m,
        EVEN_K=h % cfg.bk == 0, **dot_flags(w), num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return dx, dw, db
