"""dpo_loss and sequence_log_probs: fp64 parity with an independent full-logits implementation,
ragged masks, bf16 error bounds, Liger peer parity, bad input and gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from proxykd_fast.losses import available_backends, dpo_loss, sequence_log_probs
from proxykd_fast.losses._preference import plan_pairs
from tests.support.loss_cases import max_rel_err

LOSS_TYPES = ["sigmoid", "ipo", "hinge", "robust", "apo_zero"]
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "nll"]
TOL = 1e-9


# ------------------------------------------------------------------------------------------
# Independent plain-torch implementation: full [2B, T, V] logits, autograd does the gradients.


def plain_seq_logps(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, average: bool) -> tuple[Tensor, Tensor]:
    """(per-row log-prob sum or mean, per-row sum) from materialized logits (upcast to >= fp32 like HF)."""
    z = h @ w.t()
    if b is not None:
        z = z + b
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    mask = y != -100
    tok = torch.log_softmax(z, -1).gather(-1, torch.where(mask, y, 0)[..., None]).squeeze(-1)
    tok = torch.where(mask, tok, torch.zeros_like(tok))
    total = tok.sum(-1)
    n = mask.sum(-1).clamp(min=1).to(total.dtype)
    return (total / n if average else total), total


def plain_dpo(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, *, ref_logps: Tensor | None = None,
              ref: tuple | None = None, beta: float = 0.1, loss_type: str = "sigmoid", nll_alpha: float = 0.0,
              sample_weight: Tensor | None = None, average_log_prob: bool = False,
              label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The documented DPO-family loss written out directly (softplus forms) for the tests."""
    avg = average_log_prob or loss_type == "ipo"
    seq, total = plain_seq_logps(h, w, b, y, avg)
    if ref is not None:
        with torch.no_grad():
            ref_logps = plain_seq_logps(*ref, y, False)[1]
    ref_sums = ref_logps.to(seq.dtype)  # the reference is always given as sums (TRL's convention)
    n_tok = (y != -100).sum(-1).clamp(min=1).to(seq.dtype)
    ref_scaled = ref_sums / n_tok if avg else ref_sums
    B = h.shape[0] // 2
    dc, dr = seq[:B] - ref_scaled[:B], seq[B:] - ref_scaled[B:]
    m = dc - dr
    ls = label_smoothing
    if loss_type == "sigmoid":
        per = (1 - ls) * F.softplus(-beta * m) + ls * F.softplus(beta * m)
    elif loss_type == "robust":
        per = ((1 - ls) * F.softplus(-beta * m) - ls * F.softplus(beta * m)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        per = (1 - beta * m).clamp(min=0)
    elif loss_type == "ipo":
        per = (m - 0.5 / beta).pow(2)
    else:
        per = 1 - 1 / (1 + torch.exp(-beta * dc)) + 1 / (1 + torch.exp(-beta * dr))
    wts = torch.ones(B, dtype=per.dtype) if sample_weight is None else sample_weight.to(per.dtype)
    n_chosen = int((y[:B] != -100).sum())
    nll = -total[:B].sum() / max(n_chosen, 1)
    loss = (wts * per).sum() / B + nll_alpha * nll
    # TRL logs from sums (for ipo too); with average_log_prob the per-token means the loss then uses
    m_seq, m_ref = ((total / n_tok, ref_sums / n_tok) if average_log_prob else (total, ref_sums))
    m_seq = m_seq.detach()
    rc, rr = beta * (m_seq[:B] - m_ref[:B]), beta * (m_seq[B:] - m_ref[B:])
    metrics = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
               "rewards/accuracies": (rc > rr).to(rc.dtype).mean(), "rewards/margins": (rc - rr).mean(),
               "logps/chosen": m_seq[:B].mean(), "logps/rejected": m_seq[B:].mean(),
               "nll": nll.detach()}
    return loss, metrics


# ------------------------------------------------------------------------------------------
# Problems


def make_case(B: int = 3, T: int = 11, H: int = 23, V: int = 509, Hr: int = 17, *, seed: int = 0,
              dtype: torch.dtype = torch.float64, ragged: bool = False) -> dict:
    """Random DPO batch: prompts masked, right padding; ragged adds nearly empty and 1-token rows."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*size: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*size, generator=g, dtype=torch.float64) * std).to(dtype)

    y = torch.randint(0, V, (2 * B, T), generator=g)
    for r in range(2 * B):
        prompt = int(torch.randint(1, max(2, T // 2), (1,), generator=g))
        end = int(torch.randint(prompt + 1, T + 1, (1,), generator=g))
        y[r, :prompt] = -100
        y[r, end:] = -100
    if ragged:
        y[0, :-1] = -100  # chosen row with a single completion token (the last)
        y[B + 1, :] = -100
        y[B + 1, T // 2] = int(torch.randint(0, V, (1,), generator=g))  # rejected row with one token mid-way
        y[1, 2:] = -100  # almost fully masked chosen row: one token at position 1
        y[1, :1] = -100
    return dict(
        h=rnd(2 * B, T, H), w=rnd(V, H, std=2.0 / H**0.5), b=rnd(V, std=0.5), y=y,
        rh=rnd(2 * B, T, Hr), rw=rnd(V, Hr, std=2.0 / Hr**0.5), rb=rnd(V, std=0.5),
        ref_logps=(torch.randn(2 * B, generator=g, dtype=torch.float64) * 3 - 30),
        sw=torch.rand(B, generator=g, dtype=torch.float64) * 2,
    )


def run_ours(c: dict, *, ref: str, backend: str = "torch", bias: bool = True, **kw) -> tuple:
    """Loss, metrics and grads (hidden, weight, bias) of dpo_loss on fresh leaves."""
    h, w = c["h"].clone().requires_grad_(), c["w"].clone().requires_grad_()
    b = c["b"].clone().requires_grad_() if bias else None
    if ref == "online":
        kw.update(ref_hidden=c["rh"], ref_weight=c["rw"], ref_bias=c["rb"] if bias else None)
    else:
        kw.update(ref_logps=c["ref_logps"])
    loss, metrics = dpo_loss(h, w, c["y"], bias=b, backend=backend, **kw)
    loss.backward()
    return loss.detach(), metrics, h.grad, w.grad, None if b is None else b.grad


def run_plain(c: dict, *, ref: str, bias: bool = True, dtype: torch.dtype | None = None, **kw) -> tuple:
    """The same through the plain implementation (optionally in another dtype)."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    h, w = cast(c["h"]).clone().requires_grad_(), cast(c["w"]).clone().requires_grad_()
    b = cast(c["b"]).clone().requires_grad_() if bias else None
    if ref == "online":
        kw["ref"] = (cast(c["rh"]), cast(c["rw"]), cast(c["rb"]) if bias else None)
    else:
        kw["ref_logps"] = c["ref_logps"]
    kw.pop("chunk_size", None)
    loss, metrics = plain_dpo(h, w, b, c["y"], **kw)
    loss.backward()
    return loss.detach(), metrics, h.grad, w.grad, None if b is None else b.grad


def assert_match(a: tuple, b: tuple, tol: float = TOL, metric_tol: float | None = None) -> None:
    """Loss, every metric and every gradient agree to a relative tolerance."""
    metric_tol = tol if metric_tol is None else metric_tol
    assert max_rel_err(a[0], b[0]) < tol, f"loss: {a[0]} vs {b[0]}"
    assert set(a[1]) == set(METRICS)
    for k in METRICS:
        assert not a[1][k].requires_grad
        err = float((a[1][k].double() - b[1][k].double()).abs()) / max(1.0, float(b[1][k].double().abs()))
        assert err < metric_tol, f"{k}: {a[1][k]} vs {b[1][k]}"
    for name, x, y in zip(("d_hidden", "d_weight", "d_bias"), a[2:], b[2:]):
        assert max_rel_err(x, y) < tol, f"{name}: rel err {max_rel_err(x, y):.3e}"


# ------------------------------------------------------------------------------------------
# fp64 parity


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("ref", ["online", "precomputed"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_matches_plain_fp64(loss_type: str, ref: str, backend: str) -> None:
    c = make_case(seed=1)
    kw = dict(beta=0.3, loss_type=loss_type, nll_alpha=0.7, sample_weight=c["sw"],
              label_smoothing=0.15 if loss_type in ("sigmoid", "robust") else 0.0)
    plain = run_plain(c, ref=ref, **kw)
    for chunk_size in ([None, 5, 14, 40] if backend == "torch" else [None]):
        assert_match(run_ours(c, ref=ref, backend=backend, chunk_size=chunk_size, **kw), plain)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_ragged_masks_and_options(loss_type: str, average_log_prob: bool) -> None:
    c = make_case(B=4, T=13, seed=2, ragged=True)
    kw = dict(beta=0.05, loss_type=loss_type, average_log_prob=average_log_prob)
    for chunk_size, bias in ((None, False), (3, True), (9, True)):
        assert_match(run_ours(c, ref="online", bias=bias, chunk_size=chunk_size, **kw),
                     run_plain(c, ref="online", bias=bias, **kw))


def test_fully_masked_rows_count_as_zero() -> None:
    c = make_case(B=2, T=6, seed=3)
    c["y"][1] = -100  # a chosen row with no completion
    c["y"][3] = -100  # and a rejected one
    kw = dict(nll_alpha=1.0, average_log_prob=True)
    ours, plain = run_ours(c, ref="precomputed", chunk_size=4, **kw), run_plain(c, ref="precomputed", **kw)
    assert torch.isfinite(ours[0])
    assert_match(ours, plain)


def test_no_completion_tokens_at_all() -> None:
    c = make_case(B=2, T=5, seed=4)
    c["y"][:] = -100
    for ref in ("online", "precomputed"):
        ours, plain = run_ours(c, ref=ref, nll_alpha=1.0), run_plain(c, ref=ref, nll_alpha=1.0)
        assert float(ours[3].abs().max()) == 0.0
        assert_match(ours, plain)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_every_token_valid(backend: str) -> None:
    c = make_case(B=2, T=7, seed=15)
    c["y"] = torch.randint(0, 509, (4, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(nll_alpha=0.5, loss_type="ipo", beta=0.8)
    assert_match(run_ours(c, ref="online", backend=backend, chunk_size=9, **kw), run_plain(c, ref="online", **kw))
    out = sequence_log_probs(c["h"], c["w"], c["y"], bias=c["b"], backend=backend)
    assert max_rel_err(out, plain_seq_logps(c["h"], c["w"], c["b"], c["y"], False)[0]) < TOL


def test_unit_sample_weight_is_the_plain_mean_and_weights_scale_pairs() -> None:
    c = make_case(seed=5)
    base = run_ours(c, ref="precomputed")
    ones = run_ours(c, ref="precomputed", sample_weight=torch.ones(3))
    assert_match(ones, base)
    w = torch.tensor([0.0, 2.0, 0.5])
    per_pair = []
    for p in range(3):
        sub = {k: v for k, v in c.items()}
        rows = [p, 3 + p]
        for k in ("h", "y", "rh", "ref_logps"):
            sub[k] = c[k][rows]
        per_pair.append(run_ours(sub, ref="precomputed")[0])
    expected = sum(float(wi) * float(li) for wi, li in zip(w, per_pair)) / 3
    got = run_ours(c, ref="precomputed", sample_weight=w)[0]
    assert abs(float(got) - expected) < 1e-12 * max(1.0, abs(expected))


def test_upstream_gradient_scales_and_no_grad_matches() -> None:
    c = make_case(seed=6)
    h, w, b = (c[k].clone().requires_grad_() for k in ("h", "w", "b"))
    loss, _ = dpo_loss(h, w, c["y"], bias=b, ref_logps=c["ref_logps"], nll_alpha=0.2, chunk_size=6)
    (2.5 * loss).backward()
    ref = run_ours(c, ref="precomputed", nll_alpha=0.2, chunk_size=6)
    for x, y in zip((h.grad, w.grad, b.grad), ref[2:]):
        assert max_rel_err(x, 2.5 * y) < TOL
    with torch.no_grad():
        loss2, m2 = dpo_loss(c["h"], c["w"], c["y"], bias=c["b"], ref_logps=c["ref_logps"], nll_alpha=0.2)
    assert max_rel_err(loss2, ref[0]) < TOL
    assert not loss2.requires_grad
    h2 = c["h"].clone().requires_grad_()  # only hidden needs a gradient (frozen head)
    loss3, _ = dpo_loss(h2, c["w"], c["y"], bias=c["b"], ref_logps=c["ref_logps"], nll_alpha=0.2, chunk_size=6)
    loss3.backward()
    assert max_rel_err(h2.grad, ref[2]) < TOL


def test_plan_packs_whole_pairs_and_streams_long_ones() -> None:
    B, T = 4, 10
    y = torch.zeros(2 * B, T, dtype=torch.long)
    y[:, :2] = -100  # 8 tokens per row, 16 per pair
    y[1, :] = -100  # pair 1 has 8 tokens

    def spans(plan) -> list[tuple]:
        return [(c.start, c.stop, *c.meta) for c in plan.chunks]

    plan = plan_pairs(y.view(-1), (2 * B, T), -100, 20)
    assert spans(plan) == [(0, 16, 0, 1, False), (16, 24, 1, 2, False), (24, 40, 2, 3, False),
                           (40, 56, 3, 4, False)]
    plan = plan_pairs(y.view(-1), (2 * B, T), -100, 26)
    assert spans(plan) == [(0, 24, 0, 2, False), (24, 40, 2, 3, False), (40, 56, 3, 4, False)]
    plan = plan_pairs(y.view(-1), (2 * B, T), -100, 10)
    assert spans(plan)[:3] == [(0, 10, 0, 1, True), (10, 16, 0, 1, True), (16, 24, 1, 2, False)]
    assert all(c.stop - c.start <= 10 for c in plan.chunks)
    assert all(torch.equal(c.rows, plan.idx[c.start : c.stop]) for c in plan.chunks)
    # pair-major order: chosen row then rejected row of each pair
    assert plan.row[:16].tolist() == [0] * 8 + [4] * 8


def test_gradcheck_tiny() -> None:
    g = torch.Generator().manual_seed(7)
    B, T, H, V = 2, 4, 3, 7
    h = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, 0] = -100
    rh = torch.randn(2 * B, T, 5, generator=g, dtype=torch.float64)
    rw = torch.randn(V, 5, generator=g, dtype=torch.float64)
    for loss_type, chunk_size in (("sigmoid", None), ("ipo", 2), ("apo_zero", 5), ("robust", 3)):
        def f(h: Tensor, w: Tensor, b: Tensor, loss_type: str = loss_type, chunk_size: int | None = chunk_size) -> Tensor:
            return dpo_loss(h, w, y, bias=b, ref_hidden=rh, ref_weight=rw, beta=0.5, loss_type=loss_type,
                            nll_alpha=0.3, label_smoothing=0.1 if loss_type == "robust" else 0.0,
                            chunk_size=chunk_size)[0]
        assert torch.autograd.gradcheck(f, (h, w, b), fast_mode=True)
    # one full (slow-mode) Jacobian check on an even smaller case, streamed in 2-token chunks
    hs, ws, bs = h[:2, :3, :2].detach().clone(), w[:5, :2].detach().clone(), b[:5].detach().clone()
    ys = torch.tensor([[-100, 1, 4], [0, -100, 3]])
    lp = torch.tensor([-3.0, -2.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w, b: dpo_loss(h, w, ys, bias=b, ref_logps=lp, beta=0.7, nll_alpha=0.4, chunk_size=2)[0],
        (hs.requires_grad_(), ws.requires_grad_(), bs.requires_grad_()))


# ------------------------------------------------------------------------------------------
# sequence_log_probs


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_sequence_log_probs_matches_plain(average: bool, backend: str) -> None:
    c = make_case(B=3, T=9, seed=8, ragged=True)
    c["y"][2] = -100
    h, w, b = (c[k].clone().requires_grad_() for k in ("h", "w", "b"))
    out = sequence_log_probs(h, w, c["y"], bias=b, average=average, chunk_size=4, backend=backend)
    h2, w2, b2 = (c[k].clone().requires_grad_() for k in ("h", "w", "b"))
    ref = plain_seq_logps(h2, w2, b2, c["y"], average)[0]
    assert out.shape == (6,) and out.dtype == torch.float64 and float(out[2].detach()) == 0.0
    up = torch.linspace(-1, 2, 6, dtype=torch.float64)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    assert max_rel_err(out.detach(), ref.detach()) < TOL
    for x, y in zip((h.grad, w.grad, b.grad), (h2.grad, w2.grad, b2.grad)):
        assert max_rel_err(x, y) < TOL


def test_sequence_log_probs_temperature_and_precomputed_reference() -> None:
    c = make_case(seed=9)
    out = sequence_log_probs(c["h"], c["w"], c["y"], bias=c["b"], temperature=2.0)
    ref = plain_seq_logps(c["h"] / 2.0, c["w"], c["b"] / 2.0, c["y"], False)[0]
    assert max_rel_err(out, ref) < TOL
    # precomputing the reference log-probs gives the online-reference loss exactly
    for loss_type in ("sigmoid", "ipo"):
        ref_lp = sequence_log_probs(c["rh"], c["rw"], c["y"], bias=c["rb"])  # sums, for ipo too
        c2 = dict(c, ref_logps=ref_lp)
        assert_match(run_ours(c2, ref="precomputed", loss_type=loss_type), run_ours(c, ref="online", loss_type=loss_type))


# ------------------------------------------------------------------------------------------
# bf16 and other backends


def test_bf16_error_no_worse_than_plain_bf16() -> None:
    c = make_case(B=2, T=24, H=64, V=1000, Hr=48, seed=10)
    kw = dict(beta=0.5, nll_alpha=0.5, loss_type="sigmoid")
    exact = run_plain(c, ref="online", **kw)
    cb = {k: (v.to(torch.bfloat16) if v.is_floating_point() and k not in ("ref_logps", "sw") else v)
          for k, v in c.items()}
    ours = run_ours(cb, ref="online", chunk_size=16, **kw)
    plain = run_plain(c, ref="online", dtype=torch.bfloat16, **kw)
    assert ours[2].dtype == torch.bfloat16 and ours[3].dtype == torch.bfloat16
    for i, name in ((0, "loss"), (2, "d_hidden"), (3, "d_weight"), (4, "d_bias")):
        e_ours, e_plain = max_rel_err(ours[i], exact[i]), max_rel_err(plain[i], exact[i])
        assert e_ours <= 1.25 * e_plain + 1e-3, f"{name}: ours {e_ours:.2e} vs plain bf16 {e_plain:.2e}"
    for k in METRICS:
        err = abs(float(ours[1][k]) - float(exact[1][k])) / max(1.0, abs(float(exact[1][k])))
        err_plain = abs(float(plain[1][k]) - float(exact[1][k])) / max(1.0, abs(float(exact[1][k])))
        assert err <= 2 * err_plain + 5e-3, k  # sums of ~20 bf16-rounded log-probs: rounding luck either way


OTHER_BACKENDS = [b for b in available_backends("cpu") if b not in ("torch", "reference")]


@pytest.mark.parametrize("backend", OTHER_BACKENDS or ["none"])
def test_other_backends_tiny(backend: str) -> None:
    if backend == "none":
        pytest.skip("no triton (interpreter) / cuda backend available on this machine")
    c = make_case(B=2, T=5, H=8, V=33, Hr=6, seed=11)
    c32 = {k: (v.float() if v.is_floating_point() else v) for k, v in c.items()}
    for loss_type in ("sigmoid", "apo_zero"):
        for chunk_size in (None, 3):  # 3 tokens: every pair is streamed in several chunks
            ours = run_ours(c32, ref="online", backend=backend, loss_type=loss_type, nll_alpha=0.3,
                            chunk_size=chunk_size)
            assert_match(ours, run_plain(c, ref="online", loss_type=loss_type, nll_alpha=0.3), tol=1e-4)


@pytest.mark.parametrize("backend", [b for b in OTHER_BACKENDS if b.startswith("triton")] or ["none"])
def test_triton_backends_use_their_token_epilogue(backend: str) -> None:
    """The chunked Triton strategies run the row-epilogue kernel; the tile-fused one has no logits chunk."""
    if backend == "none":
        pytest.skip("Triton interpreter not available")
    from proxykd_fast.losses._epilogue_triton import TritonTokenRows
    from proxykd_fast.losses.backends import resolve

    ops = resolve(backend, torch.device("cpu")).token_rows
    assert isinstance(ops, TritonTokenRows) if backend != "triton-fused" else ops is None


# ------------------------------------------------------------------------------------------
# Liger peer parity (fp32; its log-softmax runs in fp32)


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.2), ("apo_zero", 0.0)])
@pytest.mark.parametrize("average_log_prob", [False, True])
@pytest.mark.parametrize("nll", [False, True])
def test_matches_liger(loss_type: str, ls: float, average_log_prob: bool, nll: bool) -> None:
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    c = make_case(B=3, T=12, H=16, V=257, Hr=16, seed=12, dtype=torch.float32)
    liger = chunked.LigerFusedLinearDPOLoss(beta=0.2, alpha=0.7, compute_nll_loss=nll, compiled=False,
                                            use_ref_model=True, average_log_prob=average_log_prob,
                                            loss_type=loss_type, label_smoothing=ls)
    h, w, b = (c[k].clone().requires_grad_() for k in ("h", "w", "b"))
    loss_l, aux = liger(w, h, c["y"], b, ref_input=c["rh"], ref_weight=c["rw"], ref_bias=c["rb"])
    loss_l.backward()
    ours = run_ours(c, ref="online", beta=0.2, loss_type=loss_type, label_smoothing=ls,
                    nll_alpha=0.7 if nll else 0.0, average_log_prob=average_log_prob, chunk_size=7)
    tol = 2e-5
    assert max_rel_err(ours[0], loss_l.detach()) < tol
    for x, y in zip(ours[2:], (h.grad, w.grad, b.grad)):
        assert max_rel_err(x, y) < tol
    chosen_lp, rejected_lp, _, _, nll_l, chosen_r, rejected_r = aux
    m = ours[1]
    assert abs(float(m["logps/chosen"]) - float(chosen_lp.mean())) < tol * max(1, abs(float(chosen_lp.mean())))
    assert abs(float(m["logps/rejected"]) - float(rejected_lp.mean())) < tol * max(1, abs(float(rejected_lp.mean())))
    assert abs(float(m["rewards/chosen"]) - float(chosen_r.mean())) < tol
    assert abs(float(m["rewards/rejected"]) - float(rejected_r.mean())) < tol
    if nll:
        assert abs(float(m["nll"]) - float(nll_l)) < tol * max(1, float(nll_l))


# ------------------------------------------------------------------------------------------
# Bad input


def _call(c: dict, **over) -> None:
    kw = dict(ref_logps=c["ref_logps"])
    kw.update(over)
    h = kw.pop("hidden", c["h"])
    y = kw.pop("labels", c["y"])
    w = kw.pop("weight", c["w"])
    dpo_loss(h, w, y, **kw)


@pytest.mark.parametrize("over,exc,match", [
    (dict(hidden="odd"), ValueError, "even"),
    (dict(hidden="2d"), ValueError, r"\[rows, T, H\]"),
    (dict(ref_logps="short"), ValueError, "ref_logps must have shape"),
    (dict(ref_logps=None), ValueError, "reference is required"),
    (dict(ref_hidden="rh", ref_weight="rw"), ValueError, "not both"),
    (dict(ref_logps=None, ref_hidden="rh"), ValueError, "both ref_hidden and ref_weight"),
    (dict(ref_logps=None, ref_hidden="rh", ref_weight="rw_badvocab"), ValueError, "vocab mismatch"),
    (dict(ref_logps=None, ref_hidden="rh_badlead", ref_weight="rw"), ValueError, "ref_hidden must have leading"),
    (dict(ref_bias="rb"), ValueError, "ref_bias"),
    (dict(labels="out_of_range"), ValueError, "labels must be in"),
    (dict(labels="bad_shape"), ValueError, "labels must have shape"),
    (dict(labels="float"), TypeError, "labels must be an integer"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(loss_type="kto"), ValueError, "loss_type"),
    (dict(label_smoothing=0.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing=0.1, loss_type="hinge"), ValueError, "label_smoothing"),
    (dict(label_smoothing=0.1, loss_type="ipo"), ValueError, "label_smoothing"),
    (dict(nll_alpha=-1.0), ValueError, "nll_alpha"),
    (dict(sample_weight="bad_shape"), ValueError, "sample_weight must have shape"),
    (dict(sample_weight="negative"), ValueError, "sample_weight must be >= 0"),
    (dict(ref_logps="nan"), ValueError, "NaN"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(backend="bogus"), ValueError, "backend"),
    (dict(weight="bad_h"), ValueError, "weight"),
])
def test_bad_input(over: dict, exc: type, match: str) -> None:
    c = make_case(B=2, T=5, H=8, V=33, Hr=6, seed=13)
    values = {
        "odd": c["h"][:3], "2d": c["h"][0], "short": c["ref_logps"][:3], "rh": c["rh"], "rw": c["rw"],
        "rw_badvocab": c["rw"][:30], "rh_badlead": c["rh"][:, :4], "rb": c["rb"],
        "out_of_range": torch.full_like(c["y"], 33), "bad_shape": c["y"][:, :4], "float": c["y"].double(),
        "negative": torch.tensor([1.0, -1.0]), "nan": torch.full((4,), float("nan"), dtype=torch.float64),
        "bad_h": c["w"][:, :5],
    }
    if over.get("sample_weight") == "bad_shape":
        values["bad_shape"] = torch.ones(4)
    over = {k: values.get(v, v) if isinstance(v, str) and k not in ("loss_type", "backend") else v
            for k, v in over.items()}
    with pytest.raises(exc, match=match):
        _call(c, **over)


def test_sequence_log_probs_bad_input() -> None:
    c = make_case(B=1, T=5, H=8, V=33, seed=14)
    with pytest.raises(ValueError, match=r"\[rows, T, H\]"):
        sequence_log_probs(c["h"][0], c["w"], c["y"][0])
    with pytest.raises(ValueError, match="labels must be in"):
        sequence_log_probs(c["h"], c["w"], torch.full_like(c["y"], -5))
    with pytest.raises(ValueError, match="temperature"):
        sequence_log_probs(c["h"], c["w"], c["y"], temperature=0.0)


# ------------------------------------------------------------------------------------------
# TRL's conventions: summed reference log-probs, metrics on TRL's scale


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid", "hinge"])
def test_trl_style_summed_reference_gives_trls_loss_and_metrics(loss_type: str) -> None:
    """ref_logps are TRL's ref_chosen_logps / ref_rejected_logps (sums over completion tokens): the loss
    and the rewards/* and logps/* metrics follow TRL 1.16's DPOTrainer, written out here from its formulas
    (IPO length-normalizes inside the loss and logs from sums). Means used to be expected for ipo: sums
    then gave 4,880.7 where TRL gives 25.24."""
    c = make_case(seed=21, ragged=True)
    beta = 0.1
    ref_sums = c["ref_logps"]  # ~ -30: summed log-probs, as TRL stores them
    loss, metrics = dpo_loss(c["h"], c["w"], c["y"], bias=c["b"], ref_logps=ref_sums, beta=beta, loss_type=loss_type)
    _, sums = plain_seq_logps(c["h"], c["w"], c["b"], c["y"], False)
    n = (c["y"] != -100).sum(-1).clamp(min=1).double()
    B = c["h"].shape[0] // 2
    lc, lr = sums[:B] - ref_sums[:B], sums[B:] - ref_sums[B:]
    if loss_type == "ipo":
        per = (lc / n[:B] - lr / n[B:] - 1 / (2 * beta)) ** 2
    elif loss_type == "sigmoid":
        per = -F.logsigmoid(beta * (lc - lr))
    else:
        per = torch.relu(1 - beta * (lc - lr))
    assert max_rel_err(loss, per.mean()) < TOL
    want = {"rewards/chosen": (beta * lc).mean(), "rewards/rejected": (beta * lr).mean(),
            "rewards/accuracies": (beta * lc > beta * lr).double().mean(),
            "rewards/margins": (beta * (lc - lr)).mean(), "logps/chosen": sums[:B].mean(),
            "logps/rejected": sums[B:].mean()}
    for k, v in want.items():
        assert abs(float(metrics[k]) - float(v)) <= TOL * max(1.0, abs(float(v))), (k, metrics[k], v)


def test_average_log_prob_metrics_are_per_token_means() -> None:
    """With average_log_prob=True the loss and its metrics use per-token means (Liger's convention);
    the reference is still given as sums and normalized by the loss."""
    c = make_case(seed=22)
    _, metrics = dpo_loss(c["h"], c["w"], c["y"], ref_logps=c["ref_logps"], average_log_prob=True, beta=0.2)
    _, sums = plain_seq_logps(c["h"], c["w"], None, c["y"], False)
    n = (c["y"] != -100).sum(-1).clamp(min=1).double()
    B = c["h"].shape[0] // 2
    assert abs(float(metrics["logps/chosen"]) - float((sums[:B] / n[:B]).mean())) < TOL
    want = (0.2 * (sums[:B] / n[:B] - c["ref_logps"][:B] / n[:B])).mean()
    assert abs(float(metrics["rewards/chosen"]) - float(want)) < TOL
