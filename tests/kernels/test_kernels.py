"""Each tile-fused kernel alone against an fp64 torch reference (the backend tests cover them end to end).

linear_lse (row log-sum-exp at one or two scales), gather_logits (logits at given columns) and
linear_grad (recomputed tiles -> dX, dW, db), through their launchers in proxykd_fast.ops,
at odd and even hidden sizes (H=23 masks the K loads, H=32 takes the EVEN_K path real shapes
take), with a bias and with a bias that is -inf over whole vocab tiles. On CPU the kernels run in
the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch

from proxykd_fast.ops.gather_logits import gather_logits
from proxykd_fast.ops.linear_grad import GradTerms, tile_grad
from proxykd_fast.ops.linear_lse import row_lse
from tests.support.triton_env import DEVICE

N, V = 37, 509
HIDDEN = [23, 32]


def _head(h: int, bias: str = "normal", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fp32 hidden [N, h], weight [V, h] and a bias: None, N(0, 0.1), or -inf but for a few columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, h, generator=g)
    w = torch.randn(V, h, generator=g) * 0.3
    b = None if bias == "none" else torch.randn(V, generator=g) * 0.1
    if bias == "masked":  # whole 64-wide interpreter tiles are -inf
        keep = torch.tensor([77, 130, 450, 508])  # both vocab splits open with an all -inf tile
        b = torch.full((V,), -float("inf")).index_copy(0, keep, b[keep])
    return x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE)


def _logits64(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    z = x.double().cpu() @ w.double().cpu().T
    return z if b is None else z + b.double().cpu()


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Match an fp64 reference to rtol of its largest finite magnitude (infinities must agree exactly)."""
    ref = ref.double()
    finite = ref[torch.isfinite(ref)]
    atol = rtol * max(1.0, float(finite.abs().max()) if finite.numel() else 1.0)
    torch.testing.assert_close(got.double().cpu(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("h", HIDDEN)
@pytest.mark.parametrize("bias", ["normal", "masked"])
def test_linear_lse(h: int, bias: str) -> None:
    """Row log-sum-exp of s1*z and s2*z over several vocab splits and tiles, -inf tiles included."""
    x, w, b = _head(h, bias)
    lse1, lse2 = row_lse(x, w, b, 1.0, 0.5)
    z = _logits64(x, w, b)
    _close(lse1, torch.logsumexp(z, 1))
    _close(lse2, torch.logsumexp(0.5 * z, 1))
    only, none = row_lse(x, w, b, 2.0, None)
    assert none is None
    _close(only, torch.logsumexp(2.0 * z, 1))


@pytest.mark.parametrize("h", HIDDEN)
def test_linear_lse_bf16(h: int) -> None:
    """bf16 operands (upcast for tl.dot under the interpreter) accumulate in fp32."""
    x, w, b = (t.bfloat16() for t in _head(h))
    _close(row_lse(x, w, b, 1.0, None)[0], torch.logsumexp(_logits64(x, w, b), 1))


@pytest.mark.parametrize("h", HIDDEN)
def test_gather_logits(h: int) -> None:
    """z[i, cols[i, j]] for a few columns per row (repeats and the last column included), with and without bias."""
    x, w, b = _head(h)
    g = torch.Generator().manual_seed(1)
    cols = torch.randint(0, V, (N, 5), generator=g)
    cols[:, 3] = cols[:, 0]
    cols[0, 1] = V - 1
    cols = cols.to(DEVICE)
    for bias in (b, None):
        z = _logits64(x, w, bias)
        _close(gather_logits(x, w, bias, cols), z.gather(1, cols.cpu()))


@pytest.mark.parametrize("h", HIDDEN)
@pytest.mark.parametrize("two", [False, True])
def test_linear_grad(h: int, two: bool) -> None:
    """dX, dW, db of sum(dz * z), dz = a softmax(s1 z) + b softmax(s2 z) + sparse (column, coefficient) pairs."""
    x, w, b = _head(h)
    g = torch.Generator().manual_seed(2)
    s1, s2 = 1.0, (0.5 if two else None)
    z = _logits64(x, w, b)
    coef_a = torch.randn(N, generator=g)
    coef_b = torch.randn(N, generator=g) if two else None
    sp_cols = torch.randint(0, V, (N, 3), generator=g)
    sp_cols[:, 2] = sp_cols[:, 0]  # a repeated column adds up
    sp_coef = torch.randn(N, 3, generator=g)
    dz = coef_a.double()[:, None] * torch.softmax(s1 * z, 1)
    lse2 = None
    if two:
        dz += coef_b.double()[:, None] * torch.softmax(s2 * z, 1)
        lse2 = torch.logsumexp(s2 * z, 1).float().to(DEVICE)
    dz.scatter_add_(1, sp_cols, sp_coef.double())
    lse1 = torch.logsumexp(s1 * z, 1).float().to(DEVICE)
    dev = {"coef_a": coef_a.to(DEVICE), "coef_b": None if coef_b is None else coef_b.to(DEVICE),
           "sp_cols": sp_cols.to(DEVICE), "sp_coef": sp_coef.to(DEVICE)}
    terms = GradTerms(lse1, dev["coef_a"], dev["sp_cols"], dev["sp_coef"], s1, lse2, dev["coef_b"], s2)
    dx, dw, db = tile_grad(x, w, b, terms, (True, True, True))
    _close(dx, dz @ w.double().cpu())
    _close(dw, dz.T @ x.double().cpu())
    _close(db, dz.sum(0))
    dx, dw, db = tile_grad(x, w, b, terms, (False, True, False))
    assert dx is None and db is None
    _close(dw, dz.T @ x.double().cpu())
