"""Tile-fused forward: row log-sum-exp of scale * (X @ W.T + b) without writing any logits.

Program (m, s) owns BM rows and one contiguous vocab split; it walks the split in BN-wide
tiles, computes each tile with tl.dot and folds it into a running (max, sum-exp) per row, for
one or two scales (1 and 1/T share the tile). The host log-sum-exps the splits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .logit_tile import fold_tile, logit_tile


@triton.jit
def linear_lse_kernel(
    X, W, B, lse1, lse2,
    N, V, H, stride_x, stride_w, cols_per_split, scale1, scale2,
    HAS_BIAS: tl.constexpr, TWO: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """lse1[s, i] = logsumexp_j scale1*z_ij over split s (and lse2 at scale2 when TWO)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    rows_c = tl.where(row_ok, rows, 0).to(tl.int64)
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)
    m1 = tl.full([BM], -float("inf"), tl.float32)
    l1 = tl.zeros([BM], tl.float32)
    m2 = tl.full([BM], -float("inf"), tl.float32)
    l2 = tl.zeros([BM], tl.float32)
    for n0 in range(v_start, v_end, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < v_end
        cols_c = tl.where(col_ok, cols, v_start).to(tl.int64)
        z = logit_tile(X, W, B, rows_c, cols_c, H, stride_x, stride_w, BM, BN, BK, HAS_BIAS, EVEN_K, UPCAST, PREC)
        m1, l1 = fold_tile(m1, l1, tl.where(col_ok[None, :], z * scale1, -float("inf")))
        if TWO:
            m2, l2 = fold_tile(m2, l2, tl.where(col_ok[None, :], z * scale2, -float("inf")))
    out = pid_s * N + rows
    tl.store(lse1 + out, m1 + tl.log(l1), mask=row_ok)
    if TWO:
        tl.store(lse2 + out, m2 + tl.log(l2), mask=row_ok)
