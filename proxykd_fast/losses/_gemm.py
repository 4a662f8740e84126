"""GEMM helpers for the chunked backends: fp32 (or fp64) logits from any operands, and
a reusable workspace so a CPU step does not page-fault fresh [C, V] buffers every call."""

from __future__ import annotations

import torch
from torch import Tensor

# Bytes of [C, V] fp32 scratch a call may hold by default; chunk_size overrides it.
DEFAULT_WORKSPACE_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}

_workspace: dict[str, Tensor] = {}


def _mm_has_out_dtype(device: torch.device) -> bool:
    """Whether torch.mm(a, b, out_dtype=float32) works for low-precision inputs on this device."""
    if device.type != "cuda":
        return False
    try:
        a = torch.zeros(1, 1, device=device, dtype=torch.bfloat16)
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError):
        return False


_OUT_DTYPE_CACHE: dict[torch.device, bool] = {}


def logits_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Write logits x @ weight.T (+ bias) into the fp32/fp64 `out`; low-precision GEMMs accumulate in fp32."""
    if x.dtype == weight.dtype == out.dtype:
        if bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(bias.to(out.dtype), x, weight.t(), out=out)
        return out
    dtype = weight.dtype
    dev = x.device
    if dev not in _OUT_DTYPE_CACHE:
        _OUT_DTYPE_CACHE[dev] = _mm_has_out_dtype(dev)
    if _OUT_DTYPE_CACHE[dev] and dtype in (torch.bfloat16, torch.float16):
        out.copy_(torch.mm(x.to(dtype), weight.t(), out_dtype=torch.float32))
    elif out.dtype == torch.float64:
        out.copy_(torch.mm(x.double(), weight.double().t()))
    else:
        out.copy_(torch.mm(x.to(dtype), weight.t()))
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out


def grad_input_chunk(dlogits: Tensor, weight: Tensor) -> Tensor:
    """dX = dlogits @ weight, with dlogits cast to the weight's dtype as autograd would."""
    if weight.dtype == dlogits.dtype:
        return torch.mm(dlogits, weight)
    return torch.mm(dlogits.to(weight.dtype), weight)


def accumulate_grad_weight(dw32: Tensor, dlogits: Tensor, x: Tensor) -> None:
    """dW += dlogits.T @ x, accumulated in fp32 whatever the input dtype."""
    dw32.addmm_(dlogits.t(), x.to(dw32.dtype))


def workspace(device: torch.device, nbuf: int, rows: int, vocab: int, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """Return `nbuf` [rows, V] buffers (fp32, or fp64 for fp64 inputs); on CPU they are cached."""
    numel = nbuf * rows * vocab
    if device.type != "cpu" or dtype != torch.float32:
        return list(torch.empty(nbuf, rows, vocab, device=device, dtype=dtype).unbind(0))
    buf = _workspace.get("cpu")
    if buf is None or buf.numel() < numel:
        _workspace.pop("cpu", None)
        buf = torch.empty(numel, dtype=torch.float32)
        _workspace["cpu"] = buf
    return [buf[i * rows * vocab : (i + 1) * rows * vocab].view(rows, vocab) for i in range(nbuf)]


def release_workspace() -> None:
    """Free the cached CPU workspace (it is re-created on the next call)."""
    _workspace.clear()


def default_chunk_rows(device: torch.device, nbuf: int, vocab: int, n_rows: int) -> int:
    """Rows per chunk so that `nbuf` fp32 [rows, V] buffers fit the device's workspace budget."""
    budget = DEFAULT_WORKSPACE_BYTES["cuda" if device.type == "cuda" else "cpu"]
    rows = budget // max(1, nbuf * vocab * 4)
    rows = max(16, min(8192, rows))
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, n_rows))
