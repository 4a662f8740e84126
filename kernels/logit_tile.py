"""One [BM, BN] tile of logits X @ W.T (+ b) in fp32 registers, and how the tile-fused kernels walk and fold tiles."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def logit_tile(
    X, W, B, rows, cols, H, stride_x, stride_w,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """fp32 logits of rows x cols; `rows`/`cols` must already be clamped into range (int64).

    UPCAST runs the dot in fp32 (the CPU interpreter mishandles bf16 tl.dot); PREC is the fp32
    input precision ("ieee" for fp32 operands so results match a non-TF32 cuBLAS GEMM).
    """
    offs_k = tl.arange(0, BK)
    x_ptrs = X + rows[:, None] * stride_x + offs_k[None, :]
    w_ptrs = W + cols[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = offs_k + k0 < H
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        x_ptrs += BK
        w_ptrs += BK
    if HAS_BIAS:
        acc += tl.load(B + cols).to(tl.float32)[None, :]
    return acc


@triton.jit
def grouped_tile(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """Map a flat program id to (tile_m, tile_n) so GROUP_M row tiles sweep the vocab together (L2 reuse)."""
    per_group = GROUP_M * n_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % size_m
    tile_n = (pid % per_group) // size_m
    return tile_m, tile_n


FLOOR = tl.constexpr(-1.0e38)  # the running max never drops below it: exp(-inf - FLOOR) = 0, never NaN


@triton.jit
def fold_tile(m, s, u):
    """Fold a [BM, BN] tile (masked entries -inf) into the running row max m / sum-exp s.

    m may start at -inf; it is kept >= FLOOR, so a tile that is all -inf (masked, or a -inf
    bias over a whole tile) adds exp(-inf) = 0 instead of exp(-inf + inf) = NaN. A row with no
    finite entry ends with m = FLOOR, s = 0 and log-sum-exp m + log(s) = -inf.
    """
    m_new = tl.maximum(tl.maximum(m, tl.max(u, 1)), FLOOR)
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(u - m_new[:, None]), 1)
    return m_new, s
