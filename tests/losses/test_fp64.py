"""fp64 parity of the chunked torch backend with the reference oracle, and of the oracle with
independent textbook formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from proxykd_fast.losses import linear_cross_entropy, linear_log_probs, linear_topk, proxy_kd_loss
from tests.support.loss_cases import assert_same, make_problem, run_ce, run_kd


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_online_kd_matches_reference(divergence: str, temperature: float) -> None:
    p = make_problem(seed=1)
    kw = dict(alpha=3.0, temperature=temperature, divergence=divergence, jsd_beta=0.3,
              sample_weight=p.sample_weight, chunk_size=8)
    assert_same(run_kd(p, "torch", **kw), run_kd(p, "reference", **kw))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("bias", [True, False])
def test_offline_topk_kd_matches_reference(temperature: float, bias: bool) -> None:
    p = make_problem(seed=2, bias=bias)
    kw = dict(alpha=5.0, temperature=temperature, sample_weight=p.sample_weight, chunk_size=16)
    assert_same(run_kd(p, "torch", online=False, **kw), run_kd(p, "reference", online=False, **kw))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_cross_entropy_matches_reference(reduction: str, bias: bool) -> None:
    p = make_problem(seed=3, bias=bias)
    assert_same(run_ce(p, "torch", reduction=reduction, chunk_size=5), run_ce(p, "reference", reduction=reduction))


@pytest.mark.parametrize("online", [True, False])
def test_reduction_none_with_per_row_upstream_gradient(online: bool) -> None:
    p = make_problem(seed=4, lead=(3, 13))
    upstream = torch.randn(3, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(alpha=2.0, reduction="none", sample_weight=p.sample_weight[:, 0], upstream=upstream, chunk_size=6)
    a, b = run_kd(p, "torch", online=online, **kw), run_kd(p, "reference", online=online, **kw)
    assert a[0].shape == (3, 13)
    assert_same(a, b)


@pytest.mark.parametrize("chunk_size", [1, 7, 37, None])
def test_chunk_size_does_not_change_the_result(chunk_size: int | None) -> None:
    p = make_problem(seed=5)
    kw = dict(alpha=1.0, temperature=2.0, sample_weight=p.sample_weight)
    assert_same(run_kd(p, "torch", chunk_size=chunk_size, **kw), run_kd(p, "reference", **kw))


def test_three_dim_inputs_with_per_sequence_weights() -> None:
    p = make_problem(seed=6, lead=(4, 9))
    seq_w = torch.tensor([0.2, 1.0, 0.0, 3.0])
    rows_w = seq_w[:, None].expand(4, 9)
    a = run_kd(p, "torch", alpha=2.0, sample_weight=seq_w, chunk_size=10)
    b = run_kd(p, "reference", alpha=2.0, sample_weight=rows_w)
    assert_same(a, b)


def test_num_items_in_batch_gives_exact_gradient_accumulation() -> None:
    p = make_problem(n=40, seed=7)
    n_valid = int((p.labels != -100).sum())
    full = run_kd(p, "torch", alpha=2.0, chunk_size=8)
    halves = []
    for sl in (slice(0, 20), slice(20, 40)):
        q = make_problem(n=40, seed=7)
        q.hs, q.hp, q.labels, q.topk_ids, q.topk_lps = q.hs[sl], q.hp[sl], q.labels[sl], q.topk_ids[sl], q.topk_lps[sl]
        halves.append(run_kd(q, "torch", alpha=2.0, chunk_size=8, num_items_in_batch=n_valid))
    loss = halves[0][0] + halves[1][0]
    d_hidden = torch.cat([halves[0][1], halves[1][1]])
    d_weight = halves[0][2] + halves[1][2]
    d_bias = halves[0][3] + halves[1][3]
    assert_same((loss, d_hidden, d_weight, d_bias), full)


def test_reference_matches_textbook_formulas() -> None:
    """The oracle itself: CE vs F.cross_entropy, KL vs F.kl_div, JSD and reverse KL in probability space."""
    p = make_problem(seed=8, bias=False)
    zs = p.hs @ p.ws.T
    zp = p.hp @ p.wp.T
    y = p.labels
    valid = y != -100
    ce = linear_cross_entropy(p.hs, p.ws, y, backend="reference")
    torch.testing.assert_close(ce, F.cross_entropy(zs, y, ignore_index=-100), rtol=1e-12, atol=0)
    T, b = 2.0, 0.3
    ps, qs = torch.softmax(zp / T, -1), torch.softmax(zs / T, -1)
    m = b * ps + (1 - b) * qs
    kl_f = F.kl_div(torch.log(qs), ps, reduction="none").sum(-1)
    kl_r = (qs * (qs.log() - ps.log())).sum(-1)
    jsd = b * (ps * (ps / m).log()).sum(-1) + (1 - b) * (qs * (qs / m).log()).sum(-1)
    nll = F.cross_entropy(zs, y, ignore_index=-100, reduction="none")
    for div, d in (("forward_kl", kl_f), ("reverse_kl", kl_r), ("jsd", jsd)):
        got = proxy_kd_loss(p.hs, p.ws, y, proxy_hidden=p.hp, proxy_weight=p.wp, alpha=0.7, temperature=T,
                            divergence=div, jsd_beta=b, reduction="sum", backend="reference")
        want = (nll + 0.7 * T * T * d)[valid].sum()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    # offline: renormalized top-k softmax against the full-vocab student distribution
    pk = torch.softmax(p.topk_lps.double() / T, -1)
    want_kd = (pk * (pk.log() - torch.log_softmax(zs / T, -1).gather(1, p.topk_ids))).sum(-1) * T * T
    got = proxy_kd_loss(p.hs, p.ws, y, proxy_topk_ids=p.topk_ids, proxy_topk_logprobs=p.topk_lps, alpha=1.0,
                        temperature=T, reduction="none", backend="reference")
    torch.testing.assert_close(got[valid], (nll + want_kd)[valid], rtol=1e-10, atol=0)


def test_log_probs_match_reference_with_per_token_upstream() -> None:
    p = make_problem(seed=9, lead=(2, 19))
    g = torch.randn(2, 19, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for backend in ("torch", "reference"):
        hs, ws, bs = (t.detach().clone().requires_grad_() for t in (p.hs, p.ws, p.bs))
        lp = linear_log_probs(hs, ws, p.labels, bias=bs, temperature=1.5, chunk_size=5, backend=backend)
        (lp * g).sum().backward()
        results.append((lp.detach(), hs.grad, ws.grad, bs.grad))
    assert results[0][0].shape == (2, 19)
    assert bool((results[0][0][p.labels == -100] == 0).all())
    assert_same(*results)


@pytest.mark.parametrize("k", [1, 10, 509])
def test_topk_matches_full_softmax(k: int) -> None:
    p = make_problem(seed=10)
    ids, lps = linear_topk(p.hs, p.ws, k, bias=p.bs, temperature=0.7, chunk_size=6, backend="torch")
    full = torch.log_softmax((p.hs @ p.ws.T + p.bs) / 0.7, -1)
    want_vals, _ = full.topk(k, dim=-1)
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32 and ids.shape == (37, k)
    torch.testing.assert_close(lps, want_vals.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(full.gather(1, ids).float(), lps, rtol=1e-6, atol=1e-6)


def test_topk_keeps_leading_shape_and_needs_no_grad() -> None:
    p = make_problem(seed=11, lead=(3, 5))
    ws = p.ws.clone().requires_grad_()
    ids, lps = linear_topk(p.hs, ws, 4)
    assert ids.shape == (3, 5, 4) and lps.shape == (3, 5, 4) and not lps.requires_grad


@pytest.mark.parametrize("fn", ["kd_online", "kd_offline_T2", "ce_none", "jsd_none", "log_probs"])
def test_gradcheck(fn: str) -> None:
    p = make_problem(n=6, hs=5, hp=4, v=11, seed=12, k=3, ignore_every=4)
    y = p.labels

    def f(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        common = dict(student_bias=b, backend="torch", chunk_size=4)
        if fn == "kd_online":
            return proxy_kd_loss(h, w, y, proxy_hidden=p.hp, proxy_weight=p.wp, alpha=2.0, **common)
        if fn == "kd_offline_T2":
            return proxy_kd_loss(h, w, y, proxy_topk_ids=p.topk_ids, proxy_topk_logprobs=p.topk_lps,
                                 temperature=2.0, sample_weight=p.sample_weight, **common)
        if fn == "jsd_none":
            return proxy_kd_loss(h, w, y, proxy_hidden=p.hp, proxy_weight=p.wp, divergence="jsd",
                                 temperature=0.5, reduction="none", **common)
        if fn == "ce_none":
            return linear_cross_entropy(h, w, y, bias=b, reduction="none", chunk_size=4, backend="torch")
        return linear_log_probs(h, w, y, bias=b, temperature=1.3, chunk_size=4, backend="torch")

    inputs = tuple(t.detach().clone().requires_grad_() for t in (p.hs, p.ws, p.bs))
    assert torch.autograd.gradcheck(f, inputs)
