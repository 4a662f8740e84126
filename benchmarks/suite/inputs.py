"""Deterministic inputs of every loss, identical for every variant, device and run.

Drawn in fp32 on the CPU from a seeded generator (so a GPU run scores the same numbers), then
cast to the case's dtype: the fp64 oracle reads the cast values, so parity measures each
implementation's error, not the rounding of its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .spec import DPO_PAIRS, IGNORE_EVERY, TOPK, Case, dpo_layout

IGNORE = -100


def _labels(g: torch.Generator, n: int, v: int) -> Tensor:
    y = torch.randint(0, v, (n,), generator=g)
    y[::IGNORE_EVERY] = IGNORE
    return y


def _ragged_dpo_labels(g: torch.Generator, rows: int, t: int, v: int) -> Tensor:
    """Per row: a prompt of T/8..T/4 ignored positions, a completion of T/4..(T - prompt), right padding."""
    y = torch.randint(0, v, (rows, t), generator=g)
    for r in range(rows):
        p = int(torch.randint(max(1, t // 8), t // 4 + 1, (1,), generator=g))
        c = int(torch.randint(max(1, t // 4), t - p + 1, (1,), generator=g))
        y[r, :p] = IGNORE
        y[r, p + c:] = IGNORE
    return y


def build_inputs(case: Case, device: torch.device | str = "cpu", seed: int = 0) -> dict[str, Tensor]:
    """The tensors of `case` on `device`: hidden / weight in the case dtype, labels int64, the rest fp32.

    Keys: hidden, weight, labels (all losses); proxy_hidden, proxy_weight (kd_online, and the
    source of kd_offline's topk_ids / topk_logprobs); ref_hidden, ref_weight (dpo_online) or
    ref_logps (dpo_precomputed); grad_logp (and grad_entropy): fixed upstream gradients of the
    per-token outputs. Hidden is [N, H], or [2B, T, H] for DPO.
    """
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(seed)
    n, h, v = case.n, case.h, case.v

    def randn(*size: int) -> Tensor:  # drawn on the CPU, used on `device`
        return torch.randn(*size, generator=g).to(device)

    x = randn(n, h)
    w = randn(v, h) * 0.02
    out: dict[str, Tensor] = {}
    if case.loss.startswith("dpo"):
        b, t = dpo_layout(n)
        out["labels"] = _ragged_dpo_labels(g, 2 * b, t, v).to(device)
        rx = 0.9 * x + 0.45 * randn(n, h)
        rw = w + 0.005 * randn(v, h)
        x, rx = x.view(2 * b, t, h), rx.view(2 * b, t, h)
        if case.loss == "dpo_online":
            out["ref_hidden"], out["ref_weight"] = rx.to(dtype), rw.to(dtype)
        else:
            out["ref_logps"] = _sequence_logps(rx.to(dtype).double(), rw.to(dtype).double(), out["labels"]).float()
    else:
        out["labels"] = _labels(g, n, v).to(device)
    if case.loss in ("kd_online", "kd_offline"):
        xp = 0.8 * x + 0.6 * randn(n, h)
        wp = w + 0.02 * randn(v, h)
        if case.loss == "kd_online":
            out["proxy_hidden"], out["proxy_weight"] = xp.to(dtype), wp.to(dtype)
        else:  # the proxy's top-k targets, as an offline export would store them (fp32 log-probs)
            out["topk_ids"], out["topk_logprobs"] = _topk(xp.to(dtype).double(), wp.to(dtype).double(), TOPK)
    if case.loss.startswith("logprobs"):
        out["grad_logp"] = randn(n)
        if case.loss == "logprobs_entropy":
            out["grad_entropy"] = 0.1 * randn(n)
    out["hidden"], out["weight"] = x.to(dtype), w.to(dtype)
    return out


def _rows(v: int) -> int:
    """Rows per fp64 chunk: about 128 MB of [rows, V] logits."""
    return max(1, (128 << 20) // (8 * v))


@torch.no_grad()
def _topk(x: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k ids and fp32 log-probs of softmax(x @ w.T), in fp64 row chunks."""
    ids, lps = [], []
    for i in range(0, x.shape[0], _rows(w.shape[0])):
        lp = torch.log_softmax(x[i:i + _rows(w.shape[0])] @ w.T, -1)
        val, idx = lp.topk(k, -1)
        ids.append(idx)
        lps.append(val.float())
    return torch.cat(ids), torch.cat(lps)


@torch.no_grad()
def _sequence_logps(x: Tensor, w: Tensor, labels: Tensor) -> Tensor:
    """Exact per-row sums of token log-probs over non-ignored labels ([rows, T, H] -> [rows])."""
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for r in range(x.shape[0]):
        keep = labels[r] != IGNORE
        if keep.any():
            lp = torch.log_softmax(x[r][keep] @ w.T, -1)
            out[r] = lp.gather(1, labels[r][keep][:, None]).sum()
    return out


def valid_rows(case: Case, inputs: dict[str, Tensor]) -> int:
    """Positions whose label is scored (what the GEMM floor and the FLOP counts run over)."""
    if case.loss == "topk":
        return case.n
    return int((inputs["labels"] != IGNORE).sum())


__all__ = ["DPO_PAIRS", "IGNORE", "build_inputs", "valid_rows"]
