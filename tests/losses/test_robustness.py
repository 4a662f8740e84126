"""Robustness of every loss on every backend: concurrent threads, NaN/inf in ignored rows, -inf biases,
second derivatives refused, empty batches. Each test guards a defect the adversarial review found."""

from __future__ import annotations

import threading

import pytest
import torch

from proxykd_fast.losses import (
    available_backends,
    dpo_loss,
    linear_cross_entropy,
    linear_log_probs,
    proxy_kd_loss,
    sequence_log_probs,
)
from tests.support.loss_cases import max_rel_err

BACKENDS = [b for b in ("torch", "reference", "triton-chunked", "triton-fused") if b in available_backends("cpu")]


def _problem(n: int = 24, h: int = 16, hp: int = 12, v: int = 96, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    lp, ids = torch.log_softmax(torch.randn(n, v, generator=g), 1).topk(5, 1)
    return dict(hs=torch.randn(n, h, generator=g), ws=torch.randn(v, h, generator=g) * 0.3,
                bs=torch.randn(v, generator=g) * 0.1, hp=torch.randn(n, hp, generator=g),
                wp=torch.randn(v, hp, generator=g) * 0.3, labels=labels, ids=ids, lps=lp)


def _entry(name: str, p: dict, backend: str, hs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor) -> torch.Tensor:
    """One scalar per entry point, differentiable in hs, ws, bs."""
    if name == "ce":
        return linear_cross_entropy(hs, ws, p["labels"], bias=bs, backend=backend, chunk_size=7)
    if name == "kd":
        return proxy_kd_loss(hs, ws, p["labels"], student_bias=bs, proxy_hidden=p["hp"], proxy_weight=p["wp"],
                             temperature=2.0, backend=backend, chunk_size=7)
    if name == "kd_offline":
        return proxy_kd_loss(hs, ws, p["labels"], student_bias=bs, proxy_topk_ids=p["ids"],
                             proxy_topk_logprobs=p["lps"], temperature=0.5, backend=backend, chunk_size=7)
    if name == "kd_none":
        rows = proxy_kd_loss(hs, ws, p["labels"], student_bias=bs, proxy_hidden=p["hp"], proxy_weight=p["wp"],
                             divergence="jsd", reduction="none", backend=backend, chunk_size=7)
        return (rows * torch.linspace(0.5, 1.5, rows.numel())).sum()
    if name == "log_probs":
        return (linear_log_probs(hs, ws, p["labels"], bias=bs, backend=backend, chunk_size=7)
                * torch.linspace(-1, 1, hs.shape[0])).sum()
    if name == "entropy":
        lp, ent = linear_log_probs(hs, ws, p["labels"], bias=bs, return_entropy=True, backend=backend, chunk_size=7)
        return (lp - 0.5 * ent).sum()
    h3, y3 = hs.view(4, -1, hs.shape[1]), p["labels"].view(4, -1)  # 2 pairs (DPO) / 4 sequences
    if name == "sequence":
        return sequence_log_probs(h3, ws, y3, bias=bs, backend=backend, chunk_size=7).sum()
    assert name == "dpo"
    return dpo_loss(h3, ws, y3, bias=bs, ref_logps=torch.tensor([-9.0, -8.0, -7.5, -9.5]), nll_alpha=0.5,
                    backend=backend, chunk_size=7)[0]


ENTRIES = ["ce", "kd", "kd_offline", "kd_none", "log_probs", "entropy", "sequence", "dpo"]


def _grads(name: str, p: dict, backend: str, hs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    hs = hs.clone().requires_grad_()
    ws, bs = p["ws"].clone().requires_grad_(), p["bs"].clone().requires_grad_()
    out = _entry(name, p, backend, hs, ws, bs)
    out.backward()
    return out.detach(), hs.grad, ws.grad, bs.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ENTRIES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_or_inf_in_ignored_rows_never_poisons_a_result(backend: str, name: str, poison: float) -> None:
    """Ignored rows (padding, prompts) may hold NaN/inf hidden states: the result equals the one with those
    rows zeroed, their gradient is 0 and dW stays finite, on every backend and entry point."""
    p = _problem()
    ignored = p["labels"] == -100
    clean = p["hs"].clone()
    clean[ignored] = 0.0
    dirty = clean.clone()
    dirty[ignored] = poison
    want = _grads(name, p, backend, clean)
    got = _grads(name, p, backend, dirty)
    for what, a, b in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, want):
        assert torch.isfinite(a).all(), f"{what} is not finite"
        assert max_rel_err(a, b) < 1e-6, f"{what} differs from the clean run"
    assert bool((got[1][ignored] == 0).all())


def _kd_loss(p: dict, backend: str, hs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor, bp: torch.Tensor,
             divergence: str, temperature: float) -> torch.Tensor:
    return proxy_kd_loss(hs, ws, p["labels"], student_bias=bs, proxy_hidden=p["hp"], proxy_weight=p["wp"],
                         proxy_bias=bp, divergence=divergence, temperature=temperature, backend=backend, chunk_size=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_minus_inf_bias_masks_a_token_without_nan(backend: str, divergence: str, temperature: float) -> None:
    """Vocabulary entries masked with a -inf bias on both heads carry no mass: the KL is finite and equals
    the KL over the remaining vocabulary (fp64 oracle on the unmasked columns), gradients included."""
    p = {k: (v.double() if v.is_floating_point() else v) for k, v in _problem(seed=3).items()}
    v = p["ws"].shape[0]
    masked = torch.tensor([5, 6, 40, v - 1])
    keep = torch.ones(v, dtype=torch.bool)
    keep[masked] = False
    p["labels"][p["labels"].unsqueeze(1).eq(masked).any(1)] = 7  # no label on a masked token
    bp = torch.randn(v, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.1
    bs, bp_masked = p["bs"].clone(), bp.clone()
    bs[masked] = -float("inf")
    bp_masked[masked] = -float("inf")
    dtype = torch.float32 if backend.startswith("triton") else torch.float64
    hs, ws, bsl = (t.to(dtype).clone().requires_grad_() for t in (p["hs"], p["ws"], bs))
    q = {**p, "hp": p["hp"].to(dtype), "wp": p["wp"].to(dtype)}
    loss = _kd_loss(q, backend, hs, ws, bsl, bp_masked.to(dtype), divergence, temperature)
    loss.backward()
    # oracle: the same problem over the kept vocabulary only (labels remapped)
    remap = torch.cumsum(keep.long(), 0) - 1
    r = {**p, "labels": torch.where(p["labels"] == -100, p["labels"], remap[p["labels"].clamp_min(0)]),
         "wp": p["wp"][keep]}
    hs2, ws2, bs2 = (t.clone().requires_grad_() for t in (p["hs"], p["ws"][keep], p["bs"][keep]))
    ref = _kd_loss(r, "reference", hs2, ws2, bs2, bp[keep], divergence, temperature)
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.isfinite(loss) and max_rel_err(loss, ref) < tol
    assert max_rel_err(hs.grad, hs2.grad) < tol
    assert max_rel_err(ws.grad[keep], ws2.grad) < tol and bool((ws.grad[masked] == 0).all())
    assert bool(torch.isfinite(bsl.grad).all()) and bool((bsl.grad[masked] == 0).all())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("name", ["ce_mean", "ce_sum", "ce_none", "kd_mean", "kd_none", "log_probs", "entropy",
                                  "dpo"])
def test_second_derivatives_are_refused_not_wrong(backend: str, name: str) -> None:
    """The fused gradients are not differentiable again: a Hessian-vector product raises a clear error
    instead of silently returning a wrong value (reduction mean/sum precompute the gradient)."""
    p = _problem()
    hs = p["hs"].clone().requires_grad_()
    if name.startswith("ce"):
        out = linear_cross_entropy(hs, p["ws"], p["labels"], reduction=name[3:], backend=backend)
    elif name.startswith("kd"):
        out = proxy_kd_loss(hs, p["ws"], p["labels"], proxy_hidden=p["hp"], proxy_weight=p["wp"],
                            reduction=name[3:], backend=backend)
    elif name == "log_probs":
        out = linear_log_probs(hs, p["ws"], p["labels"], backend=backend)
    elif name == "entropy":
        out = linear_log_probs(hs, p["ws"], p["labels"], return_entropy=True, backend=backend)[1]
    else:
        out = dpo_loss(hs.view(4, -1, hs.shape[1]), p["ws"], p["labels"].view(4, -1), ref_logps=torch.zeros(4),
                       backend=backend)[0]
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(out.sum(), hs, create_graph=True)
    (g,) = torch.autograd.grad(out.sum(), hs)  # first order is fine
    assert torch.isfinite(g).all()


def test_reference_backend_second_derivative_is_exact() -> None:
    """The materializing oracle stays twice differentiable (plain autograd): its HVP matches plain torch."""
    p = {k: (v.double() if v.is_floating_point() else v) for k, v in _problem().items()}
    hs = p["hs"].clone().requires_grad_()
    vec = torch.randn_like(hs)
    ce = linear_cross_entropy(hs, p["ws"], p["labels"], bias=p["bs"], backend="reference")
    (g,) = torch.autograd.grad(ce, hs, create_graph=True)
    (hvp,) = torch.autograd.grad((g * vec).sum(), hs)
    hs2 = p["hs"].clone().requires_grad_()
    plain = torch.nn.functional.cross_entropy(hs2 @ p["ws"].T + p["bs"], p["labels"])
    (g2,) = torch.autograd.grad(plain, hs2, create_graph=True)
    (hvp2,) = torch.autograd.grad((g2 * vec).sum(), hs2)
    assert max_rel_err(hvp, hvp2) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("rows", [0, 8])
def test_empty_and_all_ignored_batches_give_zero(backend: str, temperature: float, rows: int) -> None:
    """Zero rows, or rows that are all ignored, give a 0 loss and zero gradients (offline targets at T != 1
    on triton-fused used to raise a TypeError)."""
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(rows, 16, generator=g).requires_grad_()
    ws = torch.randn(96, 16, generator=g).requires_grad_()
    labels = torch.full((rows,), -100)
    ids = torch.zeros(rows, 5, dtype=torch.long)
    lps = torch.full((rows, 5), -1.0)
    loss = proxy_kd_loss(hs, ws, labels, proxy_topk_ids=ids, proxy_topk_logprobs=lps, temperature=temperature,
                         backend=backend)
    loss.backward()
    assert float(loss) == 0.0 and bool((ws.grad == 0).all())
    rows_out = proxy_kd_loss(hs.detach(), ws.detach(), labels, proxy_topk_ids=ids, proxy_topk_logprobs=lps,
                             temperature=temperature, reduction="none", backend=backend)
    assert rows_out.shape == (rows,) and bool((rows_out == 0).all())


@pytest.mark.parametrize("backend", ["torch"])  # the Triton CPU interpreter itself is not thread-safe
def test_concurrent_threads_get_the_single_threaded_result(backend: str) -> None:
    """The CPU workspace is per thread: four threads calling the losses at once each get the result a
    single thread gets (the shared module-level buffer gave wrong losses in 40 of 40 calls)."""
    problems = [_problem(n=64, h=32, v=512, seed=s) for s in range(4)]

    def run(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ws = p["ws"].clone().requires_grad_()
        ce = linear_cross_entropy(p["hs"], ws, p["labels"], backend=backend, chunk_size=16)
        kd = proxy_kd_loss(p["hs"], ws, p["labels"], proxy_hidden=p["hp"], proxy_weight=p["wp"], backend=backend,
                           chunk_size=16)
        (ce + kd).backward()
        return (ce + kd).detach(), ws.grad

    want = [run(p) for p in problems]
    got: list = [None] * len(problems)
    errors: list = []
    start = threading.Barrier(len(problems))

    def worker(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                got[i] = run(problems[i])
        except Exception as exc:  # reported below, not swallowed
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (loss, dw), (loss0, dw0) in zip(got, want):
        assert max_rel_err(loss, loss0) < 1e-6 and max_rel_err(dw, dw0) < 1e-6
