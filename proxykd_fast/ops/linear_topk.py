"""Launcher of kernels/linear_topk.py: streaming top-k of softmax(z / T) over vocab tiles."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from proxykd_fast.kernels.linear_topk import linear_topk_kernel

from .configs import TileConfig, tile_config, vocab_splits
from .runtime import dot_flags, interpreting

MAX_STREAMING_K = 64  # the register top-k lists hold at most this many candidates


@torch.no_grad()
def streaming_topk(x: Tensor, w: Tensor, b: Tensor | None, k: int, temperature: float, *,
                   bitonic: bool | None = None, config: TileConfig | None = None) -> tuple[Tensor, Tensor]:
    """Top-k ids and log-probs of softmax(z/T) (k <= MAX_STREAMING_K), merging per-split register lists.

    `bitonic` merges tiles with tl.topk (the GPU path) rather than by max-extraction (fast under the
    interpreter); None picks bitonic except under the interpreter. `config` overrides the tile shape.
    """
    n, h = x.shape
    vocab = w.shape[0]
    kp = triton.next_power_of_2(k)
    cfg = config or tile_config("topk" if kp <= 32 else "topk64", w.dtype)
    cfg = TileConfig(cfg.bm, max(cfg.bn, kp), cfg.bk, cfg.warps, cfg.stages)
    n_split, per = vocab_splits(n, vocab, cfg, x.device)
    lse = torch.empty(n_split, n, device=x.device, dtype=torch.float32)
    vals = torch.empty(n_split, n, kp, device=x.device, dtype=torch.float32)
    idx = torch.empty(n_split, n, kp, device=x.device, dtype=torch.int64)
    linear_topk_kernel[(triton.cdiv(n, cfg.bm), n_split)](
        x, w, x if b is None else b, lse, vals, idx,
        n, vocab, h, x.stride(0), w.stride(0), per, 1.0 / temperature,
        HAS_BIAS=b is not None, KP=kp, BITONIC=not interpreting() if bitonic is None else bitonic,
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
        EVEN_K=h % cfg.bk == 0, **dot_flags(w), num_warps=cfg.warps, num_stages=cfg.stages,
    )
    cand_v = vals.permute(1, 0, 2).reshape(n, n_split * kp)
    cand_i = idx.permute(1, 0, 2).reshape(n, n_split * kp)
    # Empty slots (id -1) rank below every real column, -inf logits included: the splits hold
    # >= min(k, V) = k real candidates per row, so every returned id is in [0, V).
    rank = torch.where(cand_v.isneginf(), torch.finfo(torch.float64).min, cand_v.double())
    _, pos = torch.topk(torch.where(cand_i >= 0, rank, -float("inf")), k, dim=1)
    top_v = cand_v.gather(1, pos)
    return cand_i.gather(1, pos), top_v - torch.logsumexp(lse, 0)[:, None]
