"""Logits at a few given columns per row, z[i, j] = x_i . W[cols[i, j]] (+ b), in fp32.

The tile-fused forward only needs the label's (and the stored top-k ids') logits next to the
row log-sum-exp; one program per row dots its hidden state with J weight rows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gather_logits_kernel(
    X, W, B, cols, out, J, H, stride_x, stride_w,
    HAS_BIAS: tl.constexpr, JP: tl.constexpr, BH: tl.constexpr,
):
    """out[i, :J] = X[i] @ W[cols[i, :J]].T (+ b[cols]) accumulated in fp32; cols/out are [N, J]."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, JP)
    j_ok = j < J
    c = tl.load(cols + row * J + j, mask=j_ok, other=0).to(tl.int64)
    acc = tl.zeros([JP], tl.float32)
    for h0 in range(0, H, BH):
        hs = h0 + tl.arange(0, BH)
        h_ok = hs < H
        x = tl.load(X + row * stride_x + hs, mask=h_ok, other=0.0).to(tl.float32)
        w = tl.load(W + c[:, None] * stride_w + hs[None, :], mask=j_ok[:, None] & h_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], 1)
    if HAS_BIAS:
        acc += tl.load(B + c, mask=j_ok, other=0.0).to(tl.float32)
    tl.store(out + row * J + j, acc, mask=j_ok)
