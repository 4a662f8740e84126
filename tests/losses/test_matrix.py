"""The full option matrix of the fused losses against the fp64 oracle: every divergence and
temperature with bias on/off, sample weights on/off and small/large alpha; non-default
ignore_index for every loss, DPO included."""

from __future__ import annotations

import pytest
import torch

from proxykd_fast.losses import dpo_loss, linear_log_probs
from tests.support.loss_cases import assert_same, make_problem, run_ce, run_kd


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weights", [True, False])
@pytest.mark.parametrize("alpha", [0.5, 100.0])
def test_online_kd_option_matrix(divergence: str, temperature: float, bias: bool, weights: bool, alpha: float) -> None:
    p = make_problem(n=23, hs=13, hp=17, v=211, seed=20, bias=bias)
    kw = dict(alpha=alpha, temperature=temperature, divergence=divergence, jsd_beta=0.7,
              sample_weight=p.sample_weight if weights else None)
    assert_same(run_kd(p, "torch", chunk_size=6, **kw), run_kd(p, "reference", **kw))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("weights", [True, False])
@pytest.mark.parametrize("alpha", [0.5, 100.0])
def test_offline_kd_option_matrix(temperature: float, weights: bool, alpha: float) -> None:
    p = make_problem(n=23, hs=13, hp=17, v=211, seed=21, k=7)
    kw = dict(alpha=alpha, temperature=temperature, online=False, sample_weight=p.sample_weight if weights else None)
    assert_same(run_kd(p, "torch", chunk_size=6, **kw), run_kd(p, "reference", **kw))


def with_ignore_index(seed: int, ignore_index: int):
    """A problem whose ignored labels carry `ignore_index` (labels equal to it are ignored too)."""
    p = make_problem(n=31, hs=11, hp=9, v=97, seed=seed)
    p.labels = torch.where(p.labels == -100, torch.full_like(p.labels, ignore_index), p.labels)
    return p


@pytest.mark.parametrize("ignore_index", [0, 7])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "offline", "ce"])
def test_non_default_ignore_index(ignore_index: int, reduction: str, kind: str) -> None:
    p = with_ignore_index(22, ignore_index)
    ignored = p.labels == ignore_index
    assert 0 < int(ignored.sum()) < p.labels.numel()
    if kind == "ce":
        ours = run_ce(p, "torch", ignore_index=ignore_index, reduction=reduction, chunk_size=5)
        ref = run_ce(p, "reference", ignore_index=ignore_index, reduction=reduction)
    else:
        online = kind != "offline"
        kw = dict(alpha=2.0, ignore_index=ignore_index, reduction=reduction, online=online,
                  sample_weight=p.sample_weight, **({"divergence": kind} if online else {}))
        ours, ref = run_kd(p, "torch", chunk_size=5, **kw), run_kd(p, "reference", **kw)
    assert_same(ours, ref)
    if reduction == "none":
        assert bool((ours[0][ignored] == 0).all()) and bool((ours[1][ignored] == 0).all())


@pytest.mark.parametrize("ignore_index", [0, 7])
def test_non_default_ignore_index_log_probs_and_dpo(ignore_index: int) -> None:
    p = with_ignore_index(23, ignore_index)
    for backend in ("torch", "reference"):
        lp = linear_log_probs(p.hs, p.ws, p.labels, bias=p.bs, ignore_index=ignore_index, backend=backend)
        assert bool((lp[p.labels == ignore_index] == 0).all())
    want = linear_log_probs(p.hs, p.ws, p.labels, bias=p.bs, ignore_index=ignore_index, backend="reference")
    torch.testing.assert_close(
        linear_log_probs(p.hs, p.ws, p.labels, bias=p.bs, ignore_index=ignore_index, chunk_size=4), want,
        rtol=1e-12, atol=1e-12)
    # DPO: 2 pairs of 7-token rows (28 of the 31 rows), prompts marked with ignore_index
    h, y = p.hs[:28].reshape(4, 7, -1), p.labels[:28].reshape(4, 7).clone()
    y[:, :2] = ignore_index
    ref = torch.tensor([-3.0, -4.0, -5.0, -2.0], dtype=torch.float64)
    results = []
    for backend in ("torch", "reference"):
        hh = h.detach().clone().requires_grad_()
        loss, metrics = dpo_loss(hh, p.ws, y, ref_logps=ref, ignore_index=ignore_index, nll_alpha=0.5,
                                 chunk_size=5, backend=backend)
        loss.backward()
        results.append((loss.detach(), hh.grad, metrics["logps/chosen"]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
