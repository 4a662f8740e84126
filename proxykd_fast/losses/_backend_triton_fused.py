"""Backend 'triton-fused': tile-fused Triton kernels, the logits never exist, not even per chunk.

Like Cut Cross-Entropy, the forward computes only row log-sum-exps (tl.dot tiles folded into
an online softmax) and the few logits it needs (labels, stored top-k ids); the backward
recomputes each tile and adds its dX / dW share with fp32 atomics. Memory is the inputs, the
fp32 gradients and O(N) statistics. Covers cross-entropy, log-probs, offline top-k KD and the
streaming top-k; online-proxy KD (two heads) runs on the chunked Triton epilogue instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from proxykd_fast.kernels.gather_logits import gather_logits_kernel
from proxykd_fast.kernels.linear_grad import linear_grad_kernel
from proxykd_fast.kernels.linear_lse import linear_lse_kernel
from proxykd_fast.kernels.linear_topk import linear_topk_kernel

from . import chunked
from ._epilogue_triton import interpreting, triton_epilogue, unavailable_reason
from ._validation import KDBatch, KDOptions

__all__ = ["fused_linear_kd", "linear_log_probs", "linear_topk", "unavailable_reason"]

MAX_STREAMING_K = 64  # larger k falls back to the chunked torch top-k

# Merge tiles with tl.topk (bitonic, the GPU path) or by max-extraction (fast in the interpreter);
# None picks bitonic except under the interpreter.
TOPK_BITONIC: bool | None = None

# Tiles whose max |dlogits| is <= this are skipped in the backward (0.0 = off, exact).
TILE_GRAD_SKIP_EPS = 0.0


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of one tile kernel."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    group_m: int = 8


# Chosen for Hopper/Ampere (sm_90 / sm_80) from ptxas figures; the AOT test checks they compile
# without spills, fit shared memory and keep register headroom (spill-free when capped at 224
# registers), on triton 3.7.1 and, checked by hand, 3.6. Keys: (kind, operand bits); "topk64"
# is top-k with k > 32. ptxas takes up to all 255 registers for the bf16 lse / grad tiles but
# needs <= 200 of them (no spill at maxnreg=200, both archs, triton 3.6 and 3.7.1). The top-k
# tiles need what they use (packed int64 keys, bitonic merge): 64-row tiles took 237-255
# registers and most spilled when capped at 224-232, so they are 32 x 64 (168-206 registers);
# top-k is a no-grad precompute step, off the training step's critical path.
_GPU_CONFIGS = {
    ("lse", 16): TileConfig(128, 128, 64, 8, 3),
    ("grad", 16): TileConfig(128, 128, 64, 8, 3),
    ("topk", 16): TileConfig(64, 64, 64, 8, 3),
    ("topk64", 16): TileConfig(64, 64, 64, 8, 3),
    ("lse", 32): TileConfig(64, 64, 32, 8, 3),
    ("grad", 32): TileConfig(64, 64, 32, 8, 3),
    ("topk", 32): TileConfig(32, 64, 32, 8, 3),
    ("topk64", 32): TileConfig(32, 64, 32, 8, 3),
}
# Small tiles under the CPU interpreter so tests cover several row / vocab tiles and masks.
_INTERPRETER_CONFIGS = {
    "lse": TileConfig(16, 64, 16, 1, 1),
    "grad": TileConfig(16, 64, 16, 1, 1, 2),
    "topk": TileConfig(64, 128, 16, 1, 1),
    "topk64": TileConfig(64, 128, 16, 1, 1),
}


def tile_config(kind: str, dtype: torch.dtype) -> TileConfig:
    """The tile shape for a kernel kind ('lse', 'grad', 'topk', 'topk64') and operand dtype."""
    if interpreting():
        return _INTERPRETER_CONFIGS[kind]
    return _GPU_CONFIGS[(kind, 32 if dtype == torch.float32 else 16)]


def _dot_flags(w: Tensor) -> dict:
    """Constexpr flags for tl.dot: fp32 upcast under the interpreter, IEEE fp32 products."""
    return {"UPCAST": interpreting() and w.dtype != torch.float32,
            "PREC": "ieee" if w.dtype == torch.float32 else "tf32"}


def _splits(n: int, vocab: int, cfg: TileConfig, device: torch.device) -> tuple[int, int]:
    """(n_splits, cols_per_split): split the vocab so row tiles x splits fill the GPU about twice."""
    n_m = triton.cdiv(max(n, 1), cfg.bm)
    n_tiles = triton.cdiv(vocab, cfg.bn)
    if interpreting() or device.type != "cuda":
        want = 2
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, n_m)
    per = triton.cdiv(n_tiles, max(1, min(want, n_tiles))) * cfg.bn
    return triton.cdiv(vocab, per), per


def _operands(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Contiguous hidden (in the weight's dtype, as the GEMM reads it) and weight."""
    return hidden.to(weight.dtype).contiguous(), weight.contiguous()


def row_lse(x: Tensor, w: Tensor, b: Tensor | None, scale1: float, scale2: float | None) -> tuple[Tensor, Tensor | None]:
    """Row log-sum-exp of scale1 * z (and of scale2 * z when given) with z = x @ w.T + b."""
    n, h = x.shape
    vocab = w.shape[0]
    cfg = tile_config("lse", w.dtype)
    n_split, per = _splits(n, vocab, cfg, x.device)
    part1 = torch.empty(n_split, n, device=x.device, dtype=torch.float32)
    part2 = torch.empty_like(part1) if scale2 is not None else part1
    linear_lse_kernel[(triton.cdiv(n, cfg.bm), n_split)](
        x, w, x if b is None else b, part1, part2,
        n, vocab, h, x.stride(0), w.stride(0), per, float(scale1), float(scale2 or 1.0),
        HAS_BIAS=b is not None, TWO=scale2 is not None, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
        EVEN_K=h % cfg.bk == 0, **_dot_flags(w), num_warps=cfg.warps, num_stages=cfg.stages,
    )
    lse1 = torch.logsumexp(part1, 0)
    return lse1, (torch.logsumexp(part2, 0) if scale2 is not None else None)


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


def tile_grad(
    x: Tensor, w: Tensor, b: Tensor | None, lse1: Tensor, lse2: Tensor | None, coef_a: Tensor, coef_b: Tensor | None,
    sp_cols: Tensor, sp_coef: Tensor, scale1: float, scale2: float | None, need: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """fp32 (dX, dW, db) of sum_ij dz_ij z_ij with dz = a softmax(s1 z) + b softmax(s2 z) + sparse."""
    n, h = x.shape
    vocab = w.shape[0]
    need_dx, need_dw, need_db = need[0], need[1], need[2] and b is not None
    dx = torch.zeros(n, h, device=x.device, dtype=torch.float32) if need_dx else None
    dw = torch.zeros(vocab, h, device=x.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros(vocab, device=x.device, dtype=torch.float32) if need_db else None
    if n == 0 or not (need_dx or need_dw or need_db):
        return dx, dw, db
    cfg = tile_config("grad", w.dtype)
    two = scale2 is not None
    f32 = lse1
    grid = (triton.cdiv(n, cfg.bm) * triton.cdiv(vocab, cfg.bn),)
    linear_grad_kernel[grid](
        x, w, x if b is None else b, lse1, lse2 if two else lse1, coef_a.contiguous(),
        coef_b.contiguous() if two else coef_a, sp_cols.contiguous(), sp_coef.contiguous(), sp_cols.shape[1],
        f32 if dx is None else dx, f32 if dw is None else dw, f32 if db is None else db,
        n, vocab, h, x.stride(0), w.stride(0), float(scale1), float(scale2 or 1.0), float(TILE_GRAD_SKIP_EPS),
        HAS_BIAS=b is not None, TWO=two, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
        SKIP=TILE_GRAD_SKIP_EPS > 0.0, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m,
        EVEN_K=h % cfg.bk == 0, **_dot_flags(w), num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return dx, dw, db


def _row_grad(grad: Tensor, opts: KDOptions, n: int) -> Tensor:
    """Per-row upstream gradient of the reduced (or per-row) loss, fp32 [N]."""
    if opts.reduction == "none":
        return grad.reshape(-1).float()
    g = grad.float() / opts.denominator if opts.reduction == "mean" else grad.float()
    return g.expand(n)


def _offline_targets(lps: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(log p, p, mass) of the renormalized tempered top-k targets; all -inf rows carry no mass."""
    log_p = torch.log_softmax(lps.float() / temperature, dim=1)
    finite = torch.isfinite(log_p).any(dim=1)
    p = torch.where(finite[:, None], log_p.exp(), torch.zeros_like(log_p))
    return log_p, p, finite.float()


class TileFusedKD(torch.autograd.Function):
    """NLL (+ offline top-k forward KL) with tile-fused kernels; returns (loss, nll_sum, kd_sum)."""

    @staticmethod
    def forward(ctx, hs, ws, bs, labels, ids, lps, row_weight, opts):  # noqa: D102
        x, w = _operands(hs, ws)
        n = x.shape[0]
        T = opts.temperature
        offline = ids is not None
        two = offline and T != 1.0
        valid = labels != opts.ignore_index
        y = torch.where(valid, labels, torch.zeros_like(labels))
        cols = torch.cat([y[:, None], ids], 1) if offline else y[:, None]
        if n:
            lse1, lse2 = row_lse(x, w, bs, 1.0, 1.0 / T if two else None)
            z = gather_logits(x, w, bs, cols)
        else:
            lse1 = torch.zeros(0, device=x.device)
            lse2, z = None, torch.zeros(0, cols.shape[1], device=x.device)
        validf = valid.float()
        nll = (lse1 - z[:, 0]) * validf
        rows = nll
        kd_sum = torch.zeros((), device=x.device, dtype=torch.float64)
        p = mass = kd_w = None
        if offline:
            log_p, p, mass = _offline_targets(lps, T)
            log_qt = z[:, 1:] / T - (lse2 if two else lse1)[:, None]
            kd = (T * T) * (p * torch.where(p > 0, log_p - log_qt, torch.zeros_like(log_qt))).sum(1) * validf
            kd_w = validf * opts.alpha
            if row_weight is not None:
                kd_w = kd_w * row_weight.float()
            rows = nll + kd_w * kd
            kd_sum = kd.sum(dtype=torch.float64)
        ctx.opts, ctx.two, ctx.dtypes = opts, two, (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        ctx.save_for_backward(x, w, bs, lse1, lse2, cols, validf, p, mass, kd_w)
        nll_sum = nll.sum(dtype=torch.float64)
        ctx.mark_non_differentiable(nll_sum, kd_sum)
        if opts.reduction == "none":
            return rows, nll_sum, kd_sum
        loss = (rows.sum(dtype=torch.float64) / opts.denominator).float()
        return loss, nll_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _g_nll, _g_kd):  # noqa: D102
        x, w, bs, lse1, lse2, cols, validf, p, mass, kd_w = ctx.saved_tensors
        opts, T = ctx.opts, ctx.opts.temperature
        c_nll = _row_grad(grad_loss, opts, x.shape[0]) * validf
        coef_a, coef_b = c_nll, None
        sp_coef = -c_nll[:, None]
        if p is not None:
            c_t = c_nll * kd_w * T  # d(T^2 KL)/dz = T (mass q_T - sum_k p_k onehot(id_k))
            if ctx.two:
                coef_b = c_t * mass
            else:
                coef_a = c_nll + c_t * mass
            sp_coef = torch.cat([sp_coef, -c_t[:, None] * p], 1)
        need = tuple(ctx.needs_input_grad[:3])
        dx, dw, db = tile_grad(x, w, bs, lse1, lse2, coef_a, coef_b, cols, sp_coef, 1.0,
                               1.0 / T if ctx.two else None, need)
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (None if dx is None else dx.to(h_dtype), None if dw is None else dw.to(w_dtype),
                None if db is None else db.to(b_dtype), None, None, None, None, None)


class TileFusedLogProbs(torch.autograd.Function):
    """Per-token log softmax(z/T)[y] with tile-fused kernels; differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index):  # noqa: D102
        x, w = _operands(hidden, weight)
        valid = labels != ignore_index
        y = torch.where(valid, labels, torch.zeros_like(labels))[:, None]
        if x.shape[0]:
            lse, _ = row_lse(x, w, bias, 1.0 / temperature, None)
            out = (gather_logits(x, w, bias, y)[:, 0] / temperature - lse) * valid
        else:
            lse = out = torch.zeros(0, device=x.device)
        ctx.save_for_backward(x, w, bias, lse, y, valid)
        ctx.temperature, ctx.dtypes = temperature, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, w, bias, lse, y, valid = ctx.saved_tensors
        c = grad_out.reshape(-1).float() * valid / ctx.temperature  # d logp_y/dz = (onehot - q_T) / T
        dx, dw, db = tile_grad(x, w, bias, lse, None, -c, None, y, c[:, None], 1.0 / ctx.temperature, None,
                               tuple(ctx.needs_input_grad[:3]))
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (None if dx is None else dx.to(h_dtype), None if dw is None else dw.to(w_dtype),
                None if db is None else db.to(b_dtype), None, None, None)


@torch.no_grad()
def streaming_topk(x: Tensor, w: Tensor, b: Tensor | None, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Top-k ids and log-probs of softmax(z/T), merging per-split register top-k lists."""
    n, h = x.shape
    vocab = w.shape[0]
    kp = triton.next_power_of_2(k)
    cfg = tile_config("topk" if kp <= 32 else "topk64", w.dtype)
    bn = max(cfg.bn, kp)
    cfg = TileConfig(cfg.bm, bn, cfg.bk, cfg.warps, cfg.stages)
    n_split, per = _splits(n, vocab, cfg, x.device)
    lse = torch.empty(n_split, n, device=x.device, dtype=torch.float32)
    vals = torch.empty(n_split, n, kp, device=x.device, dtype=torch.float32)
    idx = torch.empty(n_split, n, kp, device=x.device, dtype=torch.int64)
    linear_topk_kernel[(triton.cdiv(n, cfg.bm), n_split)](
        x, w, x if b is None else b, lse, vals, idx,
        n, vocab, h, x.stride(0), w.stride(0), per, 1.0 / temperature,
        HAS_BIAS=b is not None, KP=kp, BITONIC=not interpreting() if TOPK_BITONIC is None else TOPK_BITONIC,
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
        EVEN_K=h % cfg.bk == 0, **_dot_flags(w), num_warps=cfg.warps, num_stages=cfg.stages,
    )
    cand_v = vals.permute(1, 0, 2).reshape(n, n_split * kp)
    cand_i = idx.permute(1, 0, 2).reshape(n, n_split * kp)
    # Empty slots (id -1) rank below every real column, -inf logits included: the splits hold
    # >= min(k, V) = k real candidates per row, so every returned id is in [0, V).
    rank = torch.where(cand_v.isneginf(), torch.finfo(torch.float64).min, cand_v.double())
    _, pos = torch.topk(torch.where(cand_i >= 0, rank, -float("inf")), k, dim=1)
    top_v = cand_v.gather(1, pos)
    return cand_i.gather(1, pos), top_v - torch.logsumexp(lse, 0)[:, None]


def _wide(*tensors: Tensor | None) -> bool:
    """Whether any operand is fp64 (the Triton kernels accumulate in fp32: use the torch path)."""
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def fused_linear_kd(batch: KDBatch, opts: KDOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, nll_sum, kd_sum): tile-fused for CE and offline KD, chunked Triton epilogue for online KD."""
    if batch.proxy_weight is not None:
        return chunked.fused_linear_kd(batch, opts, epilogue=triton_epilogue)
    if _wide(batch.student_hidden, batch.student_weight):
        return chunked.fused_linear_kd(batch, opts)
    return TileFusedKD.apply(batch.student_hidden, batch.student_weight, batch.student_bias, batch.labels,
                             batch.topk_ids, batch.topk_logprobs, batch.row_weight, opts)


def linear_log_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                     ignore_index: int, chunk_size: int | None) -> Tensor:
    """Per-token tempered log-probs; chunk_size is ignored (there are no chunks)."""
    if _wide(hidden, weight):
        return chunked.FusedLinearLogProbs.apply(hidden, weight, bias, labels, temperature, ignore_index, chunk_size)
    return TileFusedLogProbs.apply(hidden, weight, bias, labels, temperature, ignore_index)


def linear_topk(hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int, temperature: float,
                chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """Streaming top-k for k <= 64 (fp32/bf16/fp16), the chunked torch top-k otherwise."""
    if k > MAX_STREAMING_K or _wide(hidden, weight) or hidden.shape[0] == 0:
        return chunked.chunked_topk(hidden, weight, bias, k, temperature, chunk_size)
    x, w = _operands(hidden, weight)
    return streaming_topk(x, w, bias, k, temperature)
