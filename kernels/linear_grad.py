"""Tile-fused backward: recompute a logits tile, turn it into dlogits, add its dX / dW / db share.

Program (m, n) recomputes the [BM, BN] tile z = X_m @ W_n.T (+ b) and forms
    dz = a * softmax(scale1 * z) + b * softmax(scale2 * z) + sum_j coef_j * onehot(col_j)
from the saved row log-sum-exps, the per-row coefficients a, b and J sparse (column,
coefficient) pairs per row (the label and the stored top-k ids). It then sweeps the hidden
dimension in BK-wide slices, adding dz @ W_n into dX_m and dz.T @ X_m into dW_n with fp32
atomics. Logits never reach memory; optional tile skipping drops tiles whose |dz| is tiny.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .logit_tile import grouped_tile, logit_tile


@triton.jit
def linear_grad_kernel(
    X, W, B, lse1, lse2, coef_a, coef_b, sp_cols, sp_coef, J,
    dX, dW, dB,
    N, V, H, stride_x, stride_w, scale1, scale2, skip_eps,
    HAS_BIAS: tl.constexpr, TWO: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, SKIP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Accumulate dX [N, H], dW [V, H], dB [V] (fp32, zero-initialized) for one logits tile."""
    n_m = tl.cdiv(N, BM)
    n_n = tl.cdiv(V, BN)
    tile_m, tile_n = grouped_tile(tl.program_id(0), n_m, n_n, GROUP_M)
    rows = tile_m * BM + tl.arange(0, BM)
    cols = tile_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    col_ok = cols < V
    rows_c = tl.where(row_ok, rows, 0).to(tl.int64)
    cols_c = tl.where(col_ok, cols, 0).to(tl.int64)
    z = logit_tile(X, W, B, rows_c, cols_c, H, stride_x, stride_w, BM, BN, BK, HAS_BIAS, EVEN_K, UPCAST, PREC)

    a = tl.load(coef_a + rows_c)
    d = a[:, None] * tl.exp(z * scale1 - tl.load(lse1 + rows_c)[:, None])
    if TWO:
        b = tl.load(coef_b + rows_c)
        d += b[:, None] * tl.exp(z * scale2 - tl.load(lse2 + rows_c)[:, None])
    for j in range(J):
        cj = tl.load(sp_cols + rows_c * J + j)
        wj = tl.load(sp_coef + rows_c * J + j)
        d += tl.where(cols[None, :] == cj[:, None], wj[:, None], 0.0)
    d = tl.where(row_ok[:, None] & col_ok[None, :], d, 0.0)

    go = True
    if SKIP:
        go = tl.max(tl.max(tl.abs(d), 1), 0) > skip_eps
    if go:
        if NEED_DB:
            tl.atomic_add(dB + cols_c, tl.sum(d, 0), mask=col_ok, sem="relaxed")
        if UPCAST:
            dc = d
        else:
            dc = d.to(W.dtype.element_ty)
        offs_k = tl.arange(0, BK)
        for k0 in range(0, H, BK):
            ks = k0 + offs_k
            k_ok = ks < H
            if NEED_DX:
                if EVEN_K:
                    w = tl.load(W + cols_c[:, None] * stride_w + ks[None, :])
                else:
                    w = tl.load(W + cols_c[:, None] * stride_w + ks[None, :], mask=k_ok[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dx = tl.dot(dc, w, input_precision=PREC)
                tl.atomic_add(dX + rows_c[:, None] * H + ks[None, :], dx,
                              mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
            if NEED_DW:
                if EVEN_K:
                    x = tl.load(X + rows_c[:, None] * stride_x + ks[None, :])
                else:
                    x = tl.load(X + rows_c[:, None] * stride_x + ks[None, :], mask=k_ok[None, :], other=0.0)
                if UPCAST:
                    x = x.to(tl.float32)
                dw = tl.dot(tl.trans(dc), x, input_precision=PREC)
                tl.atomic_add(dW + cols_c[:, None] * H + ks[None, :], dw,
                              mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")
