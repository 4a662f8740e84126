"""The dW accumulation of the chunk engine: on a CPU with native bf16/fp16 GEMMs the chunk products
run in low precision (fp32 inside oneDNN, one rounding per chunk) into an fp32 accumulator stored
transposed; its error against fp64 stays at plain torch's level and the returned gradient is a
plain contiguous [V, H] tensor."""

from __future__ import annotations

import pytest
import torch

from proxykd_fast.losses import _gemm, linear_cross_entropy
from proxykd_fast.losses._gemm import (
    _cpu_lowp_gemm,
    accumulate_grad_weight,
    cpu_lowp_weight_grad,
    grad_weight_buffer,
)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("block_bytes", [None, 7 * 48 * 2])  # default: one vocab block; 7 rows: a ragged last one
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_weight_buffer_layout_and_accumulation(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                    block_bytes: int | None) -> None:
    if block_bytes is not None:
        monkeypatch.setattr(_gemm, "WEIGHT_GRAD_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 48, generator=g).to(dtype)
    buf = grad_weight_buffer(w, torch.float32, transposed=cpu_lowp_weight_grad(w, torch.float32, dtype))
    assert buf.shape == w.shape and buf.dtype == torch.float32 and not buf.any()
    lowp = _cpu_lowp_gemm(w, torch.float32)
    assert buf.is_contiguous() != lowp  # transposed storage exactly when the low-precision path runs
    ref = torch.zeros(300, 48, dtype=torch.float64)
    for _ in range(3):  # three chunks
        x = torch.randn(37, 48, generator=g).to(dtype)
        s = torch.randn(37, 300, generator=g) * 0.1
        accumulate_grad_weight(buf, s, x, s.to(dtype))
        ref += s.to(dtype).double().t() @ x.double()
    tol = 1e-2 if lowp else 1e-5
    assert _rel(buf, ref) < tol


@pytest.mark.parametrize("chunk_size", [8, 16, 1024])
def test_bf16_weight_grad_contiguous_and_no_worse_than_torch(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 64, generator=g).bfloat16()
    w = (torch.randn(1000, 64, generator=g) * 0.05).bfloat16()
    y = torch.randint(0, 1000, (96,), generator=g)
    y[::7] = -100

    def grads(fn, xx, ww):
        xx, ww = xx.clone().requires_grad_(), ww.clone().requires_grad_()
        fn(xx, ww).backward()
        return xx.grad, ww.grad

    ours = grads(lambda a, b: linear_cross_entropy(a, b, y, backend="torch", chunk_size=chunk_size), x, w)
    plain = grads(lambda a, b: torch.nn.functional.cross_entropy((a @ b.t()).float(), y), x, w)
    exact = grads(lambda a, b: torch.nn.functional.cross_entropy(a @ b.t(), y), x.double(), w.double())
    assert ours[1].is_contiguous() and ours[1].dtype == torch.bfloat16
    for o, p, e in zip(ours, plain, exact):
        assert _rel(o, e) <= 1.25 * _rel(p, e) + 2 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("direct_rows", [0, 10_000])  # 0: the blocked x.T @ G form; 10,000: one G.T @ x GEMM
def test_one_chunk_weight_grad_forms_agree_and_are_contiguous(monkeypatch: pytest.MonkeyPatch, direct_rows: int) -> None:
    monkeypatch.setattr(_gemm, "DIRECT_WEIGHT_GRAD_ROWS", direct_rows)
    monkeypatch.setattr(_gemm, "WEIGHT_GRAD_BLOCK_BYTES", 7 * 48 * 2)  # blocks of 7 vocab rows: a ragged last one
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 48, generator=g).bfloat16()
    s = (torch.randn(40, 300, generator=g) * 0.1).bfloat16()
    dw = _gemm.weight_grad_once(x, s)
    assert dw.shape == (300, 48) and dw.dtype == torch.bfloat16 and dw.is_contiguous()
    ref = s.double().t() @ x.double()
    assert _rel(dw, ref) < 1e-2
    torch.testing.assert_close(dw, torch.mm(s.t(), x), rtol=1e-2, atol=1e-3)
