"""backend='triton' / 'triton-chunked' / 'triton-fused' through the public losses.

Every case compares loss and the gradients of hidden, weight and bias with the fp64 reference
(the oracle) and with the torch backend at the same dtype. Shapes are small and odd (N=37,
H=23/31, V=509) so every kernel walks several row / vocab tiles with masked tails, plus an even
H=32 (EVEN_K: the unmasked K loads real shapes such as H=4096 take); on CPU the kernels run in
the Triton interpreter.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import proxykd_fast.losses as L
from proxykd_fast.losses._tile_fused import TileFusedOptions
from proxykd_fast.losses.backends import resolve
from proxykd_fast.ops.configs import TileConfig
from tests.support.triton_env import DEVICE

N, H, HP, V, K = 37, 23, 31, 509, 6
STRATEGIES = ["triton-chunked", "triton-fused"]


def _inputs(seed: int = 0, scale: float = 1.0, h: int = H) -> dict:
    """Student / proxy heads (student hidden size h), labels with ignored rows, offline top-k targets (fp32, CPU)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, h, generator=g) * scale
    weight = torch.randn(V, h, generator=g) * 0.3
    bias = torch.randn(V, generator=g) * 0.1
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[3, 17, 36]] = -100
    proxy_hidden = torch.randn(N, HP, generator=g)
    proxy_weight = torch.randn(V, HP, generator=g) * 0.3
    lp, ids = torch.log_softmax(torch.randn(N, V, generator=g) * 2, 1).topk(K, 1)
    lp[5, 4:] = -float("inf")
    return {"hidden": hidden, "weight": weight, "bias": bias, "labels": labels, "proxy_hidden": proxy_hidden,
            "proxy_weight": proxy_weight, "ids": ids, "lps": lp, "row_w": torch.rand(N, generator=g) + 0.5}


def _run(loss_fn, x: dict, backend: str, dtype: torch.dtype, use_bias: bool = True, upstream: bool = True):
    """Loss and (hidden, weight, bias) grads of loss_fn at `dtype`; outputs in fp64 on CPU."""
    h = x["hidden"].to(DEVICE, dtype).clone().requires_grad_()
    w = x["weight"].to(DEVICE, dtype).clone().requires_grad_()
    b = x["bias"].to(DEVICE, dtype).clone().requires_grad_() if use_bias else None
    out = loss_fn(h, w, b, x, backend)
    if out.dim():  # per-row outputs: a non-uniform upstream gradient
        weights = torch.linspace(0.5, 1.5, out.numel(), device=DEVICE, dtype=out.dtype).view_as(out)
        (out * weights).sum().backward()
    else:
        out.backward()
    grads = [h.grad, w.grad] + ([b.grad] if use_bias else [])
    return [out.detach()] + grads


def _compare(loss_fn, x: dict, backend: str, dtype: torch.dtype = torch.float32, tol: float | None = None,
             use_bias: bool = True) -> None:
    """Check `backend` against the fp64 reference (on the same rounded inputs) and the torch backend."""
    tol = tol or (2e-5 if dtype == torch.float32 else 1e-2)
    rounded = {k: (v.to(dtype).double() if v.is_floating_point() and k in ("hidden", "weight", "bias") else v)
               for k, v in x.items()}
    ref = _run(loss_fn, rounded, "reference", torch.float64, use_bias)
    got = _run(loss_fn, x, backend, dtype, use_bias)
    base = _run(loss_fn, x, "torch", dtype, use_bias)
    for name, g, r, t in zip(["loss", "d_hidden", "d_weight", "d_bias"], got, ref, base):
        assert g.dtype == t.dtype, f"{name}: dtype {g.dtype} != torch backend's {t.dtype}"
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        scale = max(float(r.abs().max()), 1e-3)
        err = float((g.double().cpu() - r.double().cpu()).abs().max()) / scale
        assert err <= tol, f"{name}: max error {err:.2e} of max |ref| {scale:.2e} (tol {tol})"
        if dtype == torch.float32:
            err_t = float((g.double().cpu() - t.double().cpu()).abs().max()) / scale
            assert err_t <= tol, f"{name}: differs from the torch backend by {err_t:.2e}"


def _ce(reduction: str = "mean", chunk_size: int | None = 16):
    return lambda h, w, b, x, be: L.linear_cross_entropy(h, w, x["labels"].to(DEVICE), bias=b, reduction=reduction,
                                                         chunk_size=chunk_size, backend=be)


def _kd(divergence: str, temperature: float, reduction: str = "mean", beta: float = 0.5, weighted: bool = False):
    def fn(h, w, b, x, be):
        return L.proxy_kd_loss(
            h, w, x["labels"].to(DEVICE), proxy_hidden=x["proxy_hidden"].to(DEVICE, h.dtype),
            proxy_weight=x["proxy_weight"].to(DEVICE, h.dtype), student_bias=b, alpha=0.7, temperature=temperature,
            divergence=divergence, jsd_beta=beta, reduction=reduction, chunk_size=16,
            sample_weight=x["row_w"].to(DEVICE) if weighted else None, backend=be)
    return fn


def _offline(temperature: float, reduction: str = "mean"):
    def fn(h, w, b, x, be):
        return L.proxy_kd_loss(
            h, w, x["labels"].to(DEVICE), proxy_topk_ids=x["ids"].to(DEVICE), proxy_topk_logprobs=x["lps"].to(DEVICE),
            student_bias=b, alpha=0.7, temperature=temperature, reduction=reduction, chunk_size=16,
            sample_weight=x["row_w"].to(DEVICE), backend=be)
    return fn


def _log_probs(temperature: float):
    return lambda h, w, b, x, be: L.linear_log_probs(h, w, x["labels"].to(DEVICE), bias=b, temperature=temperature,
                                                     chunk_size=16, backend=be)


@pytest.mark.parametrize("backend", STRATEGIES)
@pytest.mark.parametrize(("reduction", "use_bias"), [("mean", True), ("sum", False), ("none", True)])
def test_cross_entropy(backend: str, reduction: str, use_bias: bool) -> None:
    """linear_cross_entropy, every reduction, bias on / off, ignored rows."""
    _compare(_ce(reduction), _inputs(), backend, use_bias=use_bias)


@pytest.mark.parametrize(("divergence", "temperature", "reduction"),
                         [("forward_kl", 1.0, "mean"), ("forward_kl", 2.0, "none"), ("reverse_kl", 0.5, "sum"),
                          ("jsd", 2.0, "mean")])
def test_online_kd(divergence: str, temperature: float, reduction: str) -> None:
    """Online proxy KD (the fused strategy runs it on the chunked epilogue too)."""
    _compare(_kd(divergence, temperature, reduction, beta=0.3, weighted=True), _inputs(), "triton")


@pytest.mark.parametrize("backend", STRATEGIES)
@pytest.mark.parametrize(("temperature", "reduction"), [(0.5, "none"), (1.0, "mean"), (2.0, "sum")])
def test_offline_topk_kd(backend: str, temperature: float, reduction: str) -> None:
    """Offline top-k forward KL with -inf target entries and per-row weights."""
    _compare(_offline(temperature, reduction), _inputs(), backend)


@pytest.mark.parametrize("backend", STRATEGIES)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_log_probs(backend: str, temperature: float) -> None:
    """Per-token tempered log-probs with a per-token upstream gradient."""
    _compare(_log_probs(temperature), _inputs(), backend)


@pytest.mark.parametrize("backend", STRATEGIES)
def test_even_hidden(backend: str) -> None:
    """H = 32, a multiple of every tile's BK: the EVEN_K (unmasked K loads) path of the tile kernels."""
    x = _inputs(seed=3, h=32)
    _compare(_ce(), x, backend)
    _compare(_offline(2.0, "none"), x, backend)  # two softmax scales
    if backend == "triton-fused":  # both strategies share the streaming top-k kernel
        ref_ids, ref_lp = L.linear_topk(x["hidden"].double(), x["weight"].double(), 7, bias=x["bias"].double(),
                                        backend="reference")
        ids, lp = L.linear_topk(x["hidden"].to(DEVICE), x["weight"].to(DEVICE), 7, bias=x["bias"].to(DEVICE),
                                backend=backend)
        torch.testing.assert_close(lp.cpu().double(), ref_lp.double(), rtol=1e-5, atol=1e-5)
        assert (ids.cpu() == ref_ids).float().mean() > 0.99


@pytest.mark.parametrize("backend", STRATEGIES)
def test_bf16(backend: str) -> None:
    """bf16 operands: fp32 accumulation, gradients back in bf16."""
    _compare(_offline(2.0), _inputs(), backend, dtype=torch.bfloat16)
    _compare(_ce(), _inputs(), backend, dtype=torch.bfloat16, use_bias=False)


@pytest.mark.parametrize("backend", STRATEGIES)
def test_extreme_logits(backend: str) -> None:
    """|z| ~ 1e4: finite and matching fp64 (relative to the logits' scale)."""
    x = _inputs(seed=2, scale=1e4 / 6)
    _compare(_offline(0.5), x, backend, tol=1e-4)
    _compare(_kd("jsd", 0.5), x, backend, tol=1e-4)


@pytest.mark.parametrize("backend", STRATEGIES)
def test_all_ignored(backend: str) -> None:
    """Every label ignored: zero loss and zero gradients, no NaN."""
    x = _inputs()
    x["labels"][:] = -100
    out = _run(_offline(2.0), x, backend, torch.float32)
    assert all(torch.count_nonzero(t) == 0 for t in out)
    out = _run(_ce("none"), x, backend, torch.float32)
    assert all(torch.count_nonzero(t) == 0 for t in out)


def test_components_and_empty_batch() -> None:
    """return_components sums match the reference; an empty batch gives zeros on the fused path."""
    x = _inputs()
    args = (x["hidden"].to(DEVICE), x["weight"].to(DEVICE), x["labels"].to(DEVICE))
    kw = {"proxy_topk_ids": x["ids"].to(DEVICE), "proxy_topk_logprobs": x["lps"].to(DEVICE), "temperature": 2.0,
          "return_components": True}
    _, ref = L.proxy_kd_loss(*(a.double() if a.is_floating_point() else a for a in args), backend="reference", **kw)
    for backend in STRATEGIES:
        _, got = L.proxy_kd_loss(*args, backend=backend, **kw)
        for key in ("nll", "kd"):
            assert abs(float(got[key]) - float(ref[key])) <= 1e-5 * abs(float(ref[key]))
        assert int(got["valid_tokens"]) == int(ref["valid_tokens"])
    h = torch.zeros(0, H, device=DEVICE, requires_grad=True)
    loss = L.linear_cross_entropy(h, args[1], torch.zeros(0, dtype=torch.long, device=DEVICE), backend="triton-fused")
    loss.backward()
    assert float(loss.detach()) == 0.0 and h.grad.shape == (0, H)


@pytest.mark.parametrize(("k", "temperature"), [(1, 1.0), (7, 2.0), (64, 0.5), (65, 1.0)])
def test_topk(k: int, temperature: float) -> None:
    """Streaming top-k (k <= 64 in-kernel, torch fallback above) equals the reference."""
    x = _inputs()
    ref_ids, ref_lp = L.linear_topk(x["hidden"].double(), x["weight"].double(), k, bias=x["bias"].double(),
                                    temperature=temperature, backend="reference")
    ids, lp = L.linear_topk(x["hidden"].to(DEVICE), x["weight"].to(DEVICE), k, bias=x["bias"].to(DEVICE),
                            temperature=temperature, backend="triton")
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32 and ids.shape == (N, k)
    torch.testing.assert_close(lp.cpu().double(), ref_lp.double(), rtol=1e-5, atol=1e-5)
    assert (ids.cpu() == ref_ids).float().mean() > 0.99  # fp32 vs fp64 may swap near-ties


def _fused_with(**options) -> L.Backend:
    """The triton-fused backend with other tile-fused kernel options (a Backend object, not a name)."""
    base = resolve("triton-fused", torch.device(DEVICE))
    return dataclasses.replace(base, tile_fused=dataclasses.replace(base.tile_fused, options=TileFusedOptions(**options)))


TINY_TOPK = TileConfig(16, 16, 16, 1, 1)


def test_topk_bitonic_merge() -> None:
    """The GPU merge (tl.topk on packed int64 keys) agrees with the reference on tiny tiles."""
    x = _inputs()
    hidden, weight = x["hidden"][:20], x["weight"][:100]
    ref_ids, ref_lp = L.linear_topk(hidden.double(), weight.double(), 3, backend="reference")
    ids, lp = L.linear_topk(hidden.to(DEVICE), weight.to(DEVICE), 3,
                            backend=_fused_with(topk_bitonic=True, topk_config=TINY_TOPK))
    torch.testing.assert_close(lp.cpu().double(), ref_lp.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ids.cpu(), ref_ids)


def test_tile_skip_option() -> None:
    """Tile skipping is off by default (exact); a tiny threshold keeps the gradients within it."""
    assert resolve("triton-fused", torch.device(DEVICE)).tile_fused.options.grad_skip_eps == 0.0
    _compare(_ce(), _inputs(), _fused_with(grad_skip_eps=1e-12))


def test_backend_names() -> None:
    """All three Triton names are registered and usable here."""
    assert {"triton", "triton-chunked", "triton-fused"} <= set(L.BACKENDS)
    assert {"triton", "triton-chunked", "triton-fused"} <= set(L.available_backends(DEVICE))


@pytest.mark.parametrize("bitonic", [False, True])
def test_topk_mostly_masked_bias(bitonic: bool) -> None:
    """Fewer finite logits than k (a -inf bias): every id is a real column, the -inf ones tie at log-prob -inf.

    Tiny tiles make whole tiles -inf, a masked vocab tail and a last split narrower than k.
    """
    x = _inputs()
    n, v, k, finite = 16, 36, 16, [3, 20, 35]
    hidden, weight = x["hidden"][:n], x["weight"][:v]
    bias = torch.full((v,), -float("inf"))
    bias[finite] = x["bias"][finite]
    ref_ids, ref_lp = L.linear_topk(hidden.double(), weight.double(), k, bias=bias.double(), backend="reference")
    ids, lp = L.linear_topk(hidden.to(DEVICE), weight.to(DEVICE), k, bias=bias.to(DEVICE),
                            backend=_fused_with(topk_bitonic=bitonic, topk_config=TINY_TOPK))
    ids, lp = ids.cpu(), lp.cpu()
    assert bool(((ids >= 0) & (ids < v)).all()), f"ids outside [0, {v}): {ids[(ids < 0) | (ids >= v)].tolist()}"
    assert all(len(set(row.tolist())) == k for row in ids), "repeated ids in a row"
    torch.testing.assert_close(lp.double(), ref_lp.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ids[:, :3], ref_ids[:, :3])
    assert bool(torch.isneginf(lp[:, 3:]).all()) and bool(torch.isneginf(bias[ids[:, 3:]]).all())
