"""KD alone (nll_weight) and per-token log-probs with entropy (return_entropy), against fp64 formulas
written out independently, on every backend."""

from __future__ import annotations

import pytest
import torch

from proxykd_fast.losses import available_backends, linear_cross_entropy, linear_log_probs, proxy_kd_loss
from tests.support.loss_cases import leaves, make_problem, max_rel_err

BACKENDS = [b for b in ("torch", "reference", "triton-chunked", "triton-fused") if b in available_backends("cpu")]


def _kd(p, backend: str, online: bool, **kw) -> tuple:
    hs, ws, bs = leaves(p.hs, p.ws, p.bs)
    proxy = (dict(proxy_hidden=p.hp, proxy_weight=p.wp, proxy_bias=p.bp) if online
             else dict(proxy_topk_ids=p.topk_ids, proxy_topk_logprobs=p.topk_lps))
    loss = proxy_kd_loss(hs, ws, p.labels, student_bias=bs, backend=backend, chunk_size=9, **proxy, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), hs.grad, ws.grad, bs.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("nll_weight", [0.0, 0.3])
def test_nll_weight_scales_the_nll_term_only(backend: str, online: bool, nll_weight: float) -> None:
    """nll_weight * NLL + alpha * w * KD: the difference to nll_weight=1 is (1 - nll_weight) * CE, in value
    and gradient (fp64 CE from plain torch); 0 is KD alone in one call, no fp32 subtraction of two losses."""
    p = make_problem(n=30, seed=11)
    kw = dict(alpha=0.8, temperature=1.0 if online else 2.0, sample_weight=p.sample_weight)
    full = _kd(p, "reference", online, **kw)
    hs, ws, bs = leaves(p.hs, p.ws, p.bs)
    ce = torch.nn.functional.cross_entropy(hs @ ws.T + bs, p.labels, ignore_index=-100)
    ce.backward()
    want = [f - (1 - nll_weight) * c for f, c in zip(full, (ce.detach(), hs.grad, ws.grad, bs.grad))]
    dtype = torch.float32 if backend.startswith("triton") else torch.float64
    got = _kd(p.to(dtype), backend, online, nll_weight=nll_weight, **kw)
    tol = 2e-5 if dtype == torch.float32 else 1e-9
    for name, a, b in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, want):
        assert max_rel_err(a, b) < tol, f"{name}: {max_rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_alone_ignores_the_label_values(backend: str) -> None:
    """With nll_weight=0 the labels only say which rows count: other valid labels give the same result."""
    p = make_problem(n=30, seed=12, dtype=torch.float32)
    a = _kd(p, backend, True, nll_weight=0.0, reduction="none")
    q = p.to(torch.float32)
    q.labels = torch.where(p.labels == -100, p.labels, (p.labels + 17) % p.ws.shape[0])
    b = _kd(q, backend, True, nll_weight=0.0, reduction="none")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _plain_logp_entropy(h, w, b, y, temperature):
    """fp64 textbook per-token log-prob and entropy (0 on ignored rows)."""
    z = (h @ w.T + b) / temperature
    log_q = torch.log_softmax(z, -1)
    valid = y != -100
    lp = log_q.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    q = log_q.exp()
    ent = -(q * torch.where(q > 0, log_q, torch.zeros_like(log_q))).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_log_probs_with_entropy_match_fp64(backend: str, temperature: float, masked: bool) -> None:
    """(log-prob, entropy) per token, each with its own upstream gradient, equal the fp64 formulas; a -inf
    bias (masked tokens) gives finite entropies and gradients."""
    p = make_problem(n=33, seed=13)
    if masked:
        p.bs[[3, 50, 200]] = -float("inf")
        p.labels[(p.labels == 3) | (p.labels == 50) | (p.labels == 200)] = 1
    g_lp = torch.linspace(-1.0, 2.0, 33, dtype=torch.float64)
    g_h = torch.linspace(0.5, -1.5, 33, dtype=torch.float64)
    hs, ws, bs = leaves(p.hs, p.ws, p.bs)
    lp, ent = _plain_logp_entropy(hs, ws, bs, p.labels, temperature)
    (lp * g_lp + ent * g_h).sum().backward()
    want = (lp.detach(), ent.detach(), hs.grad, ws.grad, bs.grad)
    dtype = torch.float32 if backend.startswith("triton") else torch.float64
    q = p.to(dtype)
    hs, ws, bs = leaves(q.hs, q.ws, q.bs)
    lp2, ent2 = linear_log_probs(hs, ws, q.labels, bias=bs, temperature=temperature, return_entropy=True,
                                 chunk_size=8, backend=backend)
    (lp2 * g_lp.to(lp2.dtype) + ent2 * g_h.to(ent2.dtype)).sum().backward()
    got = (lp2.detach(), ent2.detach(), hs.grad, ws.grad, bs.grad)
    tol = 2e-5 if dtype == torch.float32 else 1e-9
    for name, a, b in zip(("logp", "entropy", "d_hidden", "d_weight", "d_bias"), got, want):
        assert torch.isfinite(a).all(), name
        assert max_rel_err(a, b) < tol, f"{name}: {max_rel_err(a, b):.2e}"
    assert lp2.shape == ent2.shape == q.labels.shape
    plain = linear_log_probs(q.hs, q.ws, q.labels, bias=q.bs, temperature=temperature, backend=backend)
    assert max_rel_err(plain, lp2) < tol  # the same log-probs with or without the entropy


def test_entropy_only_upstream_and_3d_shapes() -> None:
    """Only the entropy feeds the loss (the log-prob output unused): gradients still flow; [B, T] shapes kept."""
    p = make_problem(lead=(3, 7), seed=14)
    hs = p.hs.clone().requires_grad_()
    lp, ent = linear_log_probs(hs, p.ws, p.labels, return_entropy=True)
    assert lp.shape == ent.shape == (3, 7)
    ent.sum().backward()
    hs2 = p.hs.clone().requires_grad_()
    _plain_logp_entropy(hs2.reshape(21, -1), p.ws, torch.zeros(p.ws.shape[0], dtype=torch.float64),
                        p.labels.reshape(-1), 1.0)[1].sum().backward()
    assert max_rel_err(hs.grad, hs2.grad) < 1e-9


def test_cross_entropy_unchanged_by_nll_weight_plumbing() -> None:
    """linear_cross_entropy is still plain CE (its NLL weight is 1)."""
    p = make_problem(n=20, seed=15)
    ce = linear_cross_entropy(p.hs, p.ws, p.labels, bias=p.bs)
    plain = torch.nn.functional.cross_entropy(p.hs @ p.ws.T + p.bs, p.labels, ignore_index=-100)
    assert max_rel_err(ce, plain) < 1e-12
