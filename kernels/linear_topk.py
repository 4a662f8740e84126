"""Streaming top-k of softmax(z / T) over vocab tiles: the logits row is never written.

Program (m, s) owns BM rows and one vocab split. Each tl.dot tile is folded into a running
log-sum-exp and merged into a running top-KP held in registers: value and column are packed
in one int64 key (order-preserving float bits high, reversed column low, so ties keep the
lower id) so one bitonic tl.topk moves both. A tile is merged only if some entry beats a
row's current KP-th key. The host merges the splits' candidates and subtracts the lse.
Masked columns (past the split) and the initial fillers hold EMPTY, a key below every encoded
one, so a -inf logit at a real column always outranks them; slots still EMPTY at the end (a
split with fewer than KP columns) come out as id -1, value -inf, and the host merge ranks them
last, so the ids it returns are always real columns in [0, V).
BITONIC=False merges by KP max-extractions instead: the same result, but fast under the CPU
interpreter, which runs tl.topk's xor reductions element by element.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .logit_tile import fold_tile, logit_tile

LOW_MASK = tl.constexpr(0x7FFFFFFF)


@triton.jit
def encode_keys(u, cols):
    """Pack fp32 values and int32 columns into int64 keys ordered by (value, -column)."""
    bits = u.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ LOW_MASK, bits)
    return (bits.to(tl.int64) << 32) | (-(cols - LOW_MASK)).to(tl.int64)


@triton.jit
def decode_keys(keys):
    """Inverse of encode_keys: (fp32 values, int64 columns)."""
    hi = (keys >> 32).to(tl.int32)
    bits = tl.where(hi < 0, hi ^ LOW_MASK, hi)
    low = keys - (hi.to(tl.int64) << 32)
    return bits.to(tl.float32, bitcast=True), -(low - LOW_MASK)


@triton.jit
def empty_key():
    """EMPTY: the int64 key below every encoded key ([1, 1], broadcasts)."""
    return tl.full([1, 1], -2147483648, tl.int32).to(tl.int64) << 32


@triton.jit
def merge_by_extraction(best, keys, KP: tl.constexpr):
    """Top-KP of the union of two key sets by repeated row max (keys unique per row, but for EMPTY)."""
    removed = empty_key()
    kpos = tl.arange(0, KP)[None, :]
    out = best
    for kk in tl.static_range(KP):
        top = tl.maximum(tl.max(keys, 1), tl.max(best, 1))[:, None]
        out = tl.where(kpos == kk, top, out)
        keys = tl.where(keys == top, removed, keys)
        best = tl.where(best == top, removed, best)
    return out


@triton.jit
def linear_topk_kernel(
    X, W, B, lse_out, val_out, idx_out,
    N, V, H, stride_x, stride_w, cols_per_split, inv_t,
    HAS_BIAS: tl.constexpr, KP: tl.constexpr, BITONIC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Per split s: lse_out[s, i] and the KP largest z_ij / T with their columns ([S, N, KP])."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    rows_c = tl.where(row_ok, rows, 0).to(tl.int64)
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)
    m = tl.full([BM], -float("inf"), tl.float32)
    se = tl.zeros([BM], tl.float32)
    best = tl.zeros([BM, KP], tl.int64) + empty_key()
    for n0 in range(v_start, v_end, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < v_end
        cols_c = tl.where(col_ok, cols, v_start).to(tl.int64)
        z = logit_tile(X, W, B, rows_c, cols_c, H, stride_x, stride_w, BM, BN, BK, HAS_BIAS, EVEN_K, UPCAST, PREC)
        u = tl.where(col_ok[None, :], z * inv_t, -float("inf"))
        m, se = fold_tile(m, se, u)
        keys = tl.where(col_ok[None, :], encode_keys(u, cols), empty_key())
        floor = tl.min(best, 1)
        if tl.max(tl.max(tl.where(keys > floor[:, None], 1, 0), 1), 0) > 0:
            if BITONIC:
                both = tl.reshape(tl.join(best, tl.topk(keys, KP)), [BM, 2 * KP])
                best = tl.topk(both, KP)
            else:
                best = merge_by_extraction(best, keys, KP)
    out = pid_s * N + rows
    tl.store(lse_out + out, m + tl.log(se), mask=row_ok)
    vals, idx = decode_keys(best)
    filled = best > empty_key()
    vals = tl.where(filled, vals, -float("inf"))
    idx = tl.where(filled, idx, -1)
    offs = (pid_s * N + rows_c)[:, None] * KP + tl.arange(0, KP)[None, :]
    tl.store(val_out + offs, vals, mask=row_ok[:, None])
    tl.store(idx_out + offs, idx, mask=row_ok[:, None])
