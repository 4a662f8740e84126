"""Shared builders for loss tests: random problems with controllable shapes and scales."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Problem:
    """One random fused-loss problem (student head, proxy head, labels, offline targets)."""

    hs: Tensor
    ws: Tensor
    bs: Tensor | None
    hp: Tensor
    wp: Tensor
    bp: Tensor | None
    labels: Tensor
    topk_ids: Tensor
    topk_lps: Tensor
    sample_weight: Tensor

    def to(self, dtype: torch.dtype) -> Problem:
        """A copy with floating tensors cast to `dtype` (labels and ids unchanged), as leaves."""

        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(dtype).clone()

        return Problem(cast(self.hs), cast(self.ws), cast(self.bs), cast(self.hp), cast(self.wp), cast(self.bp),
                       self.labels, self.topk_ids, self.topk_lps, self.sample_weight)


def make_problem(
    n: int = 37, hs: int = 23, hp: int = 31, v: int = 509, *, seed: int = 0, bias: bool = True,
    scale: float = 1.0, ignore_every: int = 5, k: int = 10, lead: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float64,
) -> Problem:
    """Random problem whose logits have std ~ 2*scale; every `ignore_every`-th label is ignored."""
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (n,)
    n = 1
    for s in shape:
        n *= s

    def rnd(*size: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*size, generator=g, dtype=torch.float64) * std).to(dtype)

    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    topk_ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    topk_lps = torch.log_softmax(torch.randn(n, k, generator=g) * 2, dim=-1).sort(dim=-1, descending=True).values
    return Problem(
        hs=rnd(*shape, hs, std=scale),
        ws=rnd(v, hs, std=2.0 / hs**0.5),
        bs=rnd(v, std=0.5) if bias else None,
        hp=rnd(*shape, hp, std=scale),
        wp=rnd(v, hp, std=2.0 / hp**0.5),
        bp=rnd(v, std=0.5) if bias else None,
        labels=labels.view(shape),
        topk_ids=topk_ids.view(*shape, k),
        topk_lps=topk_lps.view(*shape, k),
        sample_weight=torch.rand(n, generator=g, dtype=torch.float64).float().view(shape),
    )


def leaves(*ts: Tensor | None) -> list[Tensor | None]:
    """Detached copies that require grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def run_kd(p: Problem, backend: str, *, online: bool = True, upstream: Tensor | None = None, **kw) -> tuple:
    """Loss and grads (hidden, weight, bias) of proxy_kd_loss on a fresh copy of the problem."""
    from proxykd_fast.losses import proxy_kd_loss

    hs, ws, bs = leaves(p.hs, p.ws, p.bs)
    proxy = (dict(proxy_hidden=p.hp, proxy_weight=p.wp, proxy_bias=p.bp) if online
             else dict(proxy_topk_ids=p.topk_ids, proxy_topk_logprobs=p.topk_lps))
    loss = proxy_kd_loss(hs, ws, p.labels, student_bias=bs, backend=backend, **proxy, **kw)
    out = loss.sum() if upstream is None else (loss * upstream.to(loss.dtype)).sum()
    out.backward()
    return loss.detach(), hs.grad, ws.grad, None if bs is None else bs.grad


def run_ce(p: Problem, backend: str, **kw) -> tuple:
    """Loss and grads of linear_cross_entropy on a fresh copy of the problem."""
    from proxykd_fast.losses import linear_cross_entropy

    hs, ws, bs = leaves(p.hs, p.ws, p.bs)
    loss = linear_cross_entropy(hs, ws, p.labels, bias=bs, backend=backend, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), hs.grad, ws.grad, None if bs is None else bs.grad


def max_rel_err(a: Tensor | None, b: Tensor | None) -> float:
    """max |a - b| / max(|b|, tiny), in fp64."""
    if a is None or b is None:
        assert a is None and b is None
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


TOL = 1e-9  # fp64 agreement of two exact implementations


def assert_same(a: tuple, b: tuple, tol: float = TOL) -> None:
    """Loss and every gradient agree to a relative tolerance."""
    for name, x, y in zip(("loss", "d_hidden", "d_weight", "d_bias"), a, b):
        assert max_rel_err(x, y) < tol, f"{name}: rel err {max_rel_err(x, y):.3e}"
