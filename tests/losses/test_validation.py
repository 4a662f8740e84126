"""Bad input gets a ValueError/TypeError naming the argument, never a crash or a silent broadcast."""

from __future__ import annotations

import pytest
import torch

from proxykd_fast.losses import (
    LinearCrossEntropyLoss,
    ProxyKDLoss,
    available_backends,
    linear_cross_entropy,
    linear_log_probs,
    linear_topk,
    proxy_kd_loss,
)
from tests.support.loss_cases import make_problem

P = make_problem(n=8, hs=6, hp=5, v=13, seed=0, k=3, dtype=torch.float32)


def kd(**overrides):
    """Call proxy_kd_loss on the shared problem with some arguments replaced."""
    args = dict(student_hidden=P.hs, student_weight=P.ws, labels=P.labels, proxy_hidden=P.hp, proxy_weight=P.wp)
    args.update(overrides)
    return proxy_kd_loss(args.pop("student_hidden"), args.pop("student_weight"), args.pop("labels"), **args)


CASES = [
    ("hidden 1-D", dict(student_hidden=torch.randn(6)), ValueError, "student_hidden"),
    ("weight hidden size", dict(student_weight=torch.randn(13, 7)), ValueError, "student_weight"),
    ("labels shape", dict(labels=P.labels[:5]), ValueError, "labels"),
    ("labels float", dict(labels=P.labels.float()), TypeError, "labels"),
    ("label >= V", dict(labels=torch.full((8,), 13)), ValueError, "labels"),
    ("label negative", dict(labels=torch.full((8,), -1)), ValueError, "labels"),
    ("vocab mismatch", dict(proxy_weight=torch.randn(14, 5)), ValueError, "vocab mismatch"),
    ("proxy lead shape", dict(proxy_hidden=torch.randn(7, 5)), ValueError, "proxy_hidden"),
    ("integer hidden", dict(student_hidden=torch.ones(8, 6, dtype=torch.long)), TypeError, "student_hidden"),
    ("negative temperature", dict(temperature=-1.0), ValueError, "temperature"),
    ("zero temperature", dict(temperature=0.0), ValueError, "temperature"),
    ("NaN sample weight", dict(sample_weight=torch.tensor([1.0] * 7 + [float("nan")])), ValueError, "sample_weight"),
    ("sample weight shape", dict(sample_weight=torch.ones(3)), ValueError, "sample_weight"),
    ("negative alpha", dict(alpha=-1.0), ValueError, "alpha"),
    ("divergence", dict(divergence="kl"), ValueError, "divergence"),
    ("jsd beta", dict(divergence="jsd", jsd_beta=1.0), ValueError, "jsd_beta"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("backend", dict(backend="numpy"), ValueError, "backend"),
    ("chunk size", dict(chunk_size=0), ValueError, "chunk_size"),
    ("num items", dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    ("num items tensor", dict(num_items_in_batch=torch.tensor([3.0, 4.0])), ValueError, "num_items_in_batch"),
    ("num items negative, sum", dict(num_items_in_batch=-5, reduction="sum"), ValueError, "num_items_in_batch"),
    ("num items string", dict(num_items_in_batch="7"), TypeError, "num_items_in_batch"),
    ("student bias shape", dict(student_bias=torch.randn(12)), ValueError, "student_bias"),
    ("both proxies", dict(proxy_topk_ids=P.topk_ids, proxy_topk_logprobs=P.topk_lps), ValueError, "not both"),
    ("no proxy", dict(proxy_hidden=None, proxy_weight=None), ValueError, "proxy is required"),
    ("half online proxy", dict(proxy_weight=None), ValueError, "proxy_weight"),
    ("mixed devices", dict(proxy_hidden=torch.randn(8, 5, device="meta")), ValueError, "proxy_hidden is (on meta|a meta)"),
    ("mixed devices labels", dict(labels=P.labels.to("meta")), ValueError, "labels is on meta"),
]

OFFLINE = dict(proxy_hidden=None, proxy_weight=None, proxy_topk_ids=P.topk_ids, proxy_topk_logprobs=P.topk_lps)
CASES += [
    ("k > V", {**OFFLINE, "proxy_topk_ids": torch.zeros(8, 14, dtype=torch.long),
               "proxy_topk_logprobs": torch.zeros(8, 14)}, ValueError, "k=14"),
    ("topk id out of range", {**OFFLINE, "proxy_topk_ids": torch.full((8, 3), 13)}, ValueError, "proxy_topk_ids"),
    ("topk shapes differ", {**OFFLINE, "proxy_topk_logprobs": torch.zeros(8, 2)}, ValueError, "proxy_topk_logprobs"),
    ("topk NaN", {**OFFLINE, "proxy_topk_logprobs": torch.full((8, 3), float("nan"))}, ValueError, "NaN"),
    ("offline reverse kl", {**OFFLINE, "divergence": "reverse_kl"}, ValueError, "forward_kl"),
    ("offline ids float", {**OFFLINE, "proxy_topk_ids": P.topk_ids.float()}, TypeError, "proxy_topk_ids"),
]


@pytest.mark.parametrize("overrides,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_proxy_kd_loss_rejects_bad_input(overrides: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        kd(**overrides)


def test_other_functions_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="k must be in"):
        linear_topk(P.hs, P.ws, 14)
    with pytest.raises(TypeError, match="k must be an int"):
        linear_topk(P.hs, P.ws, 2.0)
    with pytest.raises(ValueError, match="temperature"):
        linear_log_probs(P.hs, P.ws, P.labels, temperature=-2.0)
    with pytest.raises(ValueError, match="labels"):
        linear_log_probs(P.hs, P.ws, torch.full((8,), 99))
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(P.hs, torch.randn(13, 4), P.labels)
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(P.hs, P.ws, P.labels, bias=torch.randn(13, 1))
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA|not available|backend"):
        linear_cross_entropy(P.hs, P.ws, P.labels, backend="cuda")


def test_modules_match_functional_forms() -> None:
    loss = ProxyKDLoss(alpha=2.0, temperature=2.0, divergence="jsd")(P.hs, P.ws, P.labels, proxy_hidden=P.hp,
                                                                     proxy_weight=P.wp)
    torch.testing.assert_close(loss, kd(alpha=2.0, temperature=2.0, divergence="jsd"))
    ce = LinearCrossEntropyLoss(reduction="sum")(P.hs, P.ws, P.labels)
    torch.testing.assert_close(ce, linear_cross_entropy(P.hs, P.ws, P.labels, reduction="sum"))
    assert "alpha=2.0" in repr(ProxyKDLoss(alpha=2.0))


def test_available_backends_on_cpu() -> None:
    names = available_backends("cpu")
    assert "reference" in names and "torch" in names and "cuda" not in names


MORE_CASES = [
    ("divergence None", dict(divergence=None), ValueError, "divergence"),
    ("temperature string", dict(temperature="2"), TypeError, "temperature"),
    ("alpha string", dict(alpha="1"), TypeError, "alpha"),
    ("alpha bool", dict(alpha=True), TypeError, "alpha"),
    ("nll_weight negative", dict(nll_weight=-1.0), ValueError, "nll_weight"),
    ("nll_weight string", dict(nll_weight="0"), TypeError, "nll_weight"),
    ("labels list", dict(labels=P.labels.tolist()), TypeError, "labels"),
    ("ignore_index None", dict(ignore_index=None), TypeError, "ignore_index"),
    ("ignore_index float", dict(ignore_index=-100.0), TypeError, "ignore_index"),
    ("hidden size 0", dict(student_hidden=torch.randn(8, 0), student_weight=torch.randn(13, 0)), ValueError,
     "hidden size 0"),
    ("meta hidden", dict(student_hidden=torch.randn(8, 6, device="meta")), ValueError, "student_hidden is a meta"),
    ("huge temperature", dict(temperature=1e6), ValueError, "temperature"),
    ("chunk size string", dict(chunk_size="8"), TypeError, "chunk_size"),
    ("chunk size float", dict(chunk_size=8.0), TypeError, "chunk_size"),
    ("num items bool", dict(num_items_in_batch=True), TypeError, "num_items_in_batch"),
    ("reduction None", dict(reduction=None), ValueError, "reduction"),
]


@pytest.mark.parametrize("overrides,exc,match", [c[1:] for c in MORE_CASES], ids=[c[0] for c in MORE_CASES])
def test_misconfiguration_is_refused_by_name(overrides: dict, exc: type, match: str) -> None:
    """No option is silently ignored or mis-parsed: strings, bools, None where a number or a mode belongs."""
    with pytest.raises(exc, match=match):
        kd(**overrides)


def test_numbers_are_accepted_the_way_torch_accepts_them() -> None:
    """numpy scalars and 0-dim tensors for numbers (temperature, alpha, k, chunk_size, beta, ...) work."""
    import numpy as np

    from proxykd_fast.losses import dpo_loss

    base = kd()
    torch.testing.assert_close(kd(alpha=np.float32(1.0), temperature=torch.tensor(1.0), chunk_size=np.int64(3),
                                  jsd_beta=np.float64(0.5), ignore_index=np.int64(-100)), base)
    torch.testing.assert_close(kd(alpha=torch.tensor(2), nll_weight=np.int32(1)), kd(alpha=2.0))
    ids, lps = linear_topk(P.hs, P.ws, np.int64(3), chunk_size=torch.tensor(4))
    assert ids.shape == (8, 3)
    ids2, _ = linear_topk(P.hs, P.ws, torch.tensor(3))
    assert torch.equal(ids, ids2)
    h3, y3 = P.hs.view(2, 4, 6), P.labels.view(2, 4)
    a = dpo_loss(h3, P.ws, y3, ref_logps=torch.zeros(2), beta=np.float32(0.25), nll_alpha=torch.tensor(0.5))[0]
    b = dpo_loss(h3, P.ws, y3, ref_logps=torch.zeros(2), beta=0.25, nll_alpha=0.5)[0]
    torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="k must be an int"):
        linear_topk(P.hs, P.ws, torch.tensor(3.0))
    with pytest.raises(TypeError, match="beta"):
        dpo_loss(h3, P.ws, y3, ref_logps=torch.zeros(2), beta="0.1")
    with pytest.raises(TypeError, match="average_log_prob"):
        dpo_loss(h3, P.ws, y3, ref_logps=torch.zeros(2), average_log_prob="yes")
    with pytest.raises(TypeError, match="return_entropy"):
        linear_log_probs(P.hs, P.ws, P.labels, return_entropy=1)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_at_the_largest_temperature_stays_accurate(divergence: str) -> None:
    """T = 100 (the documented maximum): the fp32 KD term is >= 0 and within 1e-2 of fp64 (T = 1e6 gave -75,854)."""
    q = make_problem(n=16, hs=8, hp=8, v=64, seed=5, dtype=torch.float64)
    args = dict(proxy_hidden=q.hp, proxy_weight=q.wp, divergence=divergence, temperature=100.0, alpha=1.0,
                return_components=True)
    _, parts64 = proxy_kd_loss(q.hs, q.ws, q.labels, **args)
    f32 = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}
    _, parts32 = proxy_kd_loss(q.hs.float(), q.ws.float(), q.labels, **f32)
    assert float(parts32["kd"]) >= 0.0
    assert abs(float(parts32["kd"]) - float(parts64["kd"])) <= 1e-2 * max(1.0, float(parts64["kd"]))
