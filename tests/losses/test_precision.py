"""Low precision, extreme logits and degenerate batches: the chunked backend's error against an
fp64 oracle must be no worse than plain torch's at the same dtype, plus a small tolerance."""

from __future__ import annotations

import pytest
import torch

from proxykd_fast.losses import linear_cross_entropy, proxy_kd_loss
from tests.support.loss_cases import make_problem, run_ce, run_kd

NAMES = ("loss", "d_hidden", "d_weight", "d_bias")


def rel_norm_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in fp64."""
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def check_no_worse_than_torch(ours: tuple, plain: tuple, oracle: tuple, dtype: torch.dtype) -> None:
    """Each output of ours is within 1.25x plain torch's error (same dtype) + 2 eps of the dtype."""
    eps = torch.finfo(dtype).eps
    for name, o, t, r in zip(NAMES, ours, plain, oracle):
        if r is None:
            continue
        assert o.dtype == t.dtype, f"{name}: dtype {o.dtype} != plain torch's {t.dtype}"
        e_ours, e_torch = rel_norm_err(o, r), rel_norm_err(t, r)
        assert e_ours <= 1.25 * e_torch + 2 * eps, f"{name}: ours {e_ours:.3e} vs torch {e_torch:.3e} ({dtype})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["online_fkl", "online_rkl_T05", "online_jsd_T2", "offline_T05", "offline_T1", "ce"])
@pytest.mark.parametrize("seed", [0, 1])
def test_error_vs_fp64_no_worse_than_plain_torch(dtype: torch.dtype, mode: str, seed: int) -> None:
    p = make_problem(n=61, hs=40, hp=56, v=777, seed=seed).to(dtype)
    p64 = p.to(torch.float64)
    if mode == "ce":
        results = [run_ce(q, b) for q, b in ((p, "torch"), (p, "reference"), (p64, "reference"))]
    else:
        kw = dict(alpha=2.0, sample_weight=p.sample_weight)
        if mode == "online_jsd_T2":
            kw.update(divergence="jsd", temperature=2.0)
        if mode == "online_rkl_T05":
            kw.update(divergence="reverse_kl", temperature=0.5)
        online = mode.startswith("online")
        if mode == "offline_T05":
            kw.update(temperature=0.5)
        results = [run_kd(q, b, online=online, chunk_size=16, **kw) if b == "torch" else
                   run_kd(q, b, online=online, **kw) for q, b in ((p, "torch"), (p, "reference"), (p64, "reference"))]
    ours, plain, oracle = results
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    check_no_worse_than_torch(ours, plain, oracle, dtype)


EXTREME_CASES = [(d, t) for d in ("forward_kl", "reverse_kl", "jsd", "offline") for t in (1.0, 2.0)] + [("ce", 1.0)]


@pytest.mark.parametrize("divergence,temperature", EXTREME_CASES)
def test_extreme_logits_stay_finite_and_exact(divergence: str, temperature: float) -> None:
    """|z| ~ 1e4: softmaxes saturate to one-hot but nothing overflows (T=1 is the hot path)."""
    p = make_problem(n=29, hs=16, hp=16, v=301, seed=3, scale=2500.0, bias=False).to(torch.float32)
    zmax = float((p.hs @ p.ws.T).abs().max())
    assert 3e3 < zmax < 1e5
    if divergence == "ce":
        ours, plain = run_ce(p, "torch", chunk_size=7), run_ce(p, "reference")
        oracle = run_ce(p.to(torch.float64), "reference")
    else:
        online = divergence != "offline"
        kw = dict(alpha=1.0, temperature=temperature, online=online)
        if online:
            kw["divergence"] = divergence
        ours = run_kd(p, "torch", chunk_size=7, **kw)
        oracle = run_kd(p.to(torch.float64), "reference", **kw)
        plain = run_kd(p, "reference", **kw)
    for t in ours[:3]:
        assert torch.isfinite(t).all()
    check_no_worse_than_torch(ours, plain, oracle, torch.float32)


def test_extreme_offline_targets_with_minus_inf_entries() -> None:
    """Stored top-k log-probs may hold -inf (zero mass): they contribute nothing, never NaN."""
    p = make_problem(n=12, seed=4, scale=1000.0).to(torch.float32)
    p.topk_lps[:, 5:] = float("-inf")
    p.topk_lps[3] = float("-inf")  # a row with no target mass at all: KD term and its gradient are 0
    ours = run_kd(p, "torch", online=False, alpha=1.0, chunk_size=5)
    oracle = run_kd(p.to(torch.float64), "reference", online=False, alpha=1.0)
    for a, b in zip(ours, oracle):
        assert torch.isfinite(a).all()
        assert rel_norm_err(a, b) < 1e-4


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("online", [True, False])
def test_all_ignored_rows_give_zero_not_nan(reduction: str, online: bool) -> None:
    p = make_problem(n=9, seed=5)
    p.labels[:] = -100
    loss, dh, dw, db = run_kd(p, "torch", online=online, reduction=reduction, alpha=4.0, chunk_size=4)
    assert torch.isfinite(loss).all() and bool((loss == 0).all())
    for g in (dh, dw, db):
        assert bool((g == 0).all())
    ce = run_ce(p, "torch", reduction=reduction)
    assert bool((ce[0] == 0).all()) and bool((ce[1] == 0).all())


def test_empty_batch() -> None:
    hs = torch.zeros(0, 8, requires_grad=True)
    ws = torch.randn(16, 8, requires_grad=True)
    loss = linear_cross_entropy(hs, ws, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0 and ws.grad is not None and bool((ws.grad == 0).all())


def test_ignored_rows_get_zero_gradient_and_zero_per_row_loss() -> None:
    p = make_problem(n=20, seed=6, ignore_every=3)
    loss, dh, _, _ = run_kd(p, "torch", reduction="none", alpha=1.0)
    ignored = p.labels == -100
    assert bool((loss[ignored] == 0).all()) and bool((dh[ignored] == 0).all())
    assert bool((dh[~ignored].abs().sum(-1) > 0).all())


def test_proxy_gets_no_gradient_and_no_grad_mode_works() -> None:
    p = make_problem(n=10, seed=7)
    hp = p.hp.clone().requires_grad_()
    wp = p.wp.clone().requires_grad_()
    hs = p.hs.clone().requires_grad_()
    loss = proxy_kd_loss(hs, p.ws, p.labels, proxy_hidden=hp, proxy_weight=wp)
    loss.backward()
    assert hp.grad is None and wp.grad is None and hs.grad is not None
    with torch.no_grad():
        again = proxy_kd_loss(hs, p.ws, p.labels, proxy_hidden=hp, proxy_weight=wp)
    torch.testing.assert_close(again, loss.detach())


def test_return_components_and_alpha_zero_equals_cross_entropy() -> None:
    p = make_problem(n=15, seed=8)
    loss, parts = proxy_kd_loss(p.hs, p.ws, p.labels, proxy_hidden=p.hp, proxy_weight=p.wp, alpha=0.0,
                                student_bias=p.bs, return_components=True, reduction="sum")
    ce = linear_cross_entropy(p.hs, p.ws, p.labels, bias=p.bs, reduction="sum")
    torch.testing.assert_close(loss, ce)
    torch.testing.assert_close(parts["nll"], ce.double())
    assert float(parts["kd"]) > 0 and int(parts["valid_tokens"]) == int((p.labels != -100).sum())


def test_no_grad_mode_skips_the_gradient_gemms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.no_grad (evaluation) the chunked backend does the forward GEMMs only."""
    from proxykd_fast.losses import _engine

    calls = []
    monkeypatch.setattr(_engine, "grad_input_chunk", lambda *a: calls.append("dx") or torch.zeros(1))
    monkeypatch.setattr(_engine, "accumulate_grad_weight", lambda *a: calls.append("dw"))
    p = make_problem(n=10, seed=9)
    ws = p.ws.clone().requires_grad_()
    with torch.no_grad():
        proxy_kd_loss(p.hs, ws, p.labels, proxy_hidden=p.hp, proxy_weight=p.wp, backend="torch")
    assert calls == []


@pytest.mark.parametrize("entry", ["kd", "ce", "log_probs", "log_probs_backward", "dpo"])
def test_ignored_rows_cost_no_gemm(monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    """Prompt and padding rows are skipped by the chunk engine for every entry point: logits are
    computed for valid rows only (log-probs used to pay GEMMs for them)."""
    from proxykd_fast.losses import _engine, dpo_loss, linear_log_probs

    seen = []
    real = _engine.logits_into

    def counting(out: torch.Tensor, x: torch.Tensor, *rest: object) -> torch.Tensor:
        seen.append(x.shape[0])
        return real(out, x, *rest)

    monkeypatch.setattr(_engine, "logits_into", counting)
    p = make_problem(n=40, seed=10, ignore_every=2)
    n_valid = int((p.labels != -100).sum())
    if entry == "kd":
        run_kd(p, "torch", alpha=1.0, chunk_size=7)
        assert sum(seen) == 2 * n_valid  # student and proxy GEMMs, valid rows only
    elif entry == "ce":
        run_ce(p, "torch", chunk_size=7)
        assert sum(seen) == n_valid
    elif entry.startswith("log_probs"):
        hs = p.hs.clone().requires_grad_(entry.endswith("backward"))
        out = linear_log_probs(hs, p.ws, p.labels, chunk_size=7, backend="torch")
        if hs.requires_grad:
            out.sum().backward()  # the backward recomputes the valid rows only, too
        assert sum(seen) == n_valid * (2 if hs.requires_grad else 1)
    else:
        hs = p.hs.view(4, 10, -1).clone().requires_grad_()
        dpo_loss(hs, p.ws, p.labels.view(4, 10), ref_logps=torch.zeros(4), chunk_size=20, backend="torch")[0].backward()
        assert sum(seen) == n_valid
