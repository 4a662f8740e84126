"""GEMM helpers of the chunk engine: fp32 (or fp64) logits from any operands, and a reusable
per-thread workspace so a CPU step does not page-fault fresh [C, V] buffers every call."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from torch import Tensor

# Bytes of [C, V] fp32 scratch a call may hold by default; chunk_size overrides it.
DEFAULT_WORKSPACE_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}

# The cached CPU scratch is per thread: concurrent calls from several threads never share it.
# CUDA scratch is not cached (the caching allocator already reuses it, ordered per stream).
_local = threading.local()


_PROBES: dict[tuple[torch.device, str], bool] = {}


def _mixed_gemm_ok(device: torch.device, kind: str) -> bool:
    """Whether a bf16 x bf16 -> fp32 GEMM form works (and is right) on `device`; probed once.

    kind "mm_out": torch.mm(a, b, out_dtype=fp32, out=c); kind "addmm_acc": the same accumulated
    in place into an fp32 c. Both are CUDA-only in torch; elsewhere the callers upcast instead.
    """
    key = (device, kind)
    if key not in _PROBES:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(16, 32, device=device, generator=g).bfloat16()
                b = torch.randn(32, 8, device=device, generator=g).bfloat16()
                want = a.float() @ b.float()
                c = torch.ones(16, 8, device=device)
                if kind == "mm_out":
                    torch.mm(a, b, out_dtype=torch.float32, out=c)
                else:
                    torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
                    want = want + 1
                ok = bool(torch.allclose(c, want, rtol=1e-4, atol=1e-4))
            except (TypeError, RuntimeError):
                ok = False
        _PROBES[key] = ok
    return _PROBES[key]


def logits_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Write logits x @ weight.T (+ bias) into the fp32/fp64 `out`; low-precision GEMMs accumulate in fp32."""
    if x.dtype == weight.dtype == out.dtype:
        if bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(bias.to(out.dtype), x, weight.t(), out=out)
        return out
    dtype = weight.dtype
    if out.dtype == torch.float64:
        out.copy_(torch.mm(x.double(), weight.double().t()))
    elif dtype in (torch.bfloat16, torch.float16) and _mixed_gemm_ok(x.device, "mm_out"):
        torch.mm(x.to(dtype), weight.t(), out_dtype=torch.float32, out=out)
    else:
        out.copy_(torch.mm(x.to(dtype), weight.t()))
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out


def grad_operand(dlogits: Tensor, weight: Tensor) -> Tensor:
    """dlogits in the weight's dtype, as autograd would feed the backward GEMMs (cast once per chunk)."""
    return dlogits if dlogits.dtype == weight.dtype else dlogits.to(weight.dtype)


def grad_input_chunk(dlogits: Tensor, weight: Tensor) -> Tensor:
    """dX = dlogits @ weight, with dlogits cast to the weight's dtype as autograd would."""
    return torch.mm(grad_operand(dlogits, weight), weight)


def _cpu_lowp_gemm(weight: Tensor, acc_dtype: torch.dtype) -> bool:
    """Whether dW of this CPU weight should come from low-precision GEMMs (oneDNN runs bf16 natively
    on avx512_bf16 / AMX, fp16 on avx512_fp16 / AMX-FP16): there they are ~4x an fp32 GEMM."""
    if weight.device.type != "cpu" or acc_dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported()


def cpu_lowp_weight_grad(weight: Tensor, acc_dtype: torch.dtype, hidden_dtype: torch.dtype) -> bool:
    """Whether a pass's dW comes from CPU low-precision GEMMs (hidden and weight in the same bf16/fp16)."""
    return hidden_dtype == weight.dtype and _cpu_lowp_gemm(weight, acc_dtype)


def grad_weight_buffer(weight: Tensor, acc_dtype: torch.dtype, transposed: bool = False) -> Tensor:
    """The zeroed [V, H] dW accumulator. For the CPU low-precision path (`transposed`) it is an [H, V] block
    viewed as [V, H]: accumulate_grad_weight then adds x.T @ G, whose operands are both row-major (oneDNN's
    fast bf16 layout; G.T @ x runs ~1.7x slower), into it without a strided write."""
    if transposed:
        return torch.zeros(weight.shape[1], weight.shape[0], device=weight.device, dtype=acc_dtype).t()
    return torch.zeros(weight.shape, device=weight.device, dtype=acc_dtype)


def param_grad(t: Tensor | None, scale: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor | None:
    """A gradient the engine accumulated (fp32), times the upstream scalar `scale`, as a contiguous tensor of
    `dtype` (the parameter's): one fused multiply-cast-copy, so a transposed CPU accumulator costs no fp32 copy."""
    if t is None:
        return None
    dtype = t.dtype if dtype is None else dtype
    unit = scale is None or (scale.numel() == 1 and float(scale) == 1.0)
    if unit and t.dtype == dtype and t.is_contiguous():
        return t
    out = torch.empty(t.shape, device=t.device, dtype=dtype)
    if unit:
        return out.copy_(t)
    # a low-precision t (the one-chunk CPU product) is scaled by the fp32 scalar in fp32: one rounding
    return torch.mul(t, scale.to(torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype), out=out)


# The CPU low-precision dW runs as dW.T = x.T @ dlogits (both operands row-major: oneDNN's fast bf16 layout) by
# vocab blocks of this many bytes of [H, block] product: the product stays in cache for the add or transposed copy
# that follows (H=1024, V=32000, 2048 rows, AMX: accumulating 130 ms by 4096-column blocks vs 178 ms whole) and
# no [H, V] product is held beside the result.
WEIGHT_GRAD_BLOCK_BYTES = 8 << 20
# One low-precision CPU chunk: up to this many rows the single GEMM dlogits.T @ x into [V, H] beats the blocked
# form and its transposed copies (same machine: 48 vs 85 ms at 256 rows, 106 vs 120 at 1024, 163 vs 145 at 1536).
DIRECT_WEIGHT_GRAD_ROWS = 1024


def _weight_grad_blocks(x: Tensor, dlogits_lp: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """(vocab block b, dW.T[:, b] = x.T @ dlogits[:, b]) for blocks of WEIGHT_GRAD_BLOCK_BYTES of product each."""
    xt, vocab = x.t().contiguous(), dlogits_lp.shape[1]
    block = max(1, WEIGHT_GRAD_BLOCK_BYTES // max(1, x.shape[1] * x.element_size()))
    for v0 in range(0, vocab, block):
        b = slice(v0, min(v0 + block, vocab))
        yield b, torch.mm(xt, dlogits_lp[:, b])


def weight_grad_once(x: Tensor, dlogits_lp: Tensor) -> Tensor:
    """A one-chunk pass's dW = dlogits.T @ x as a contiguous [V, H] tensor of the inputs' low-precision dtype.

    oneDNN accumulates in fp32 and rounds once, as plain torch does. Few rows: one GEMM with the transposed
    left operand. More rows: dW.T = x.T @ dlogits by vocab blocks, each transposed into place, so that peak
    memory holds one [V, H] result (not a transposed product and its contiguous copy).
    """
    if x.shape[0] <= DIRECT_WEIGHT_GRAD_ROWS:
        return torch.mm(dlogits_lp.t(), x)
    out = torch.empty(dlogits_lp.shape[1], x.shape[1], device=x.device, dtype=x.dtype)
    for b, product in _weight_grad_blocks(x, dlogits_lp):
        out[b].copy_(product.t())
    return out


def accumulate_grad_weight(dw32: Tensor, dlogits: Tensor, x: Tensor, dlogits_lp: Tensor | None = None) -> None:
    """dW += dlogits.T @ x, accumulated in fp32 whatever the input dtype.

    On CUDA a low-precision copy of dlogits (`dlogits_lp`, shared with dX) feeds a bf16/fp16
    GEMM that accumulates straight into the fp32 buffer. On a CPU with bf16/fp16 GEMM units the
    same GEMM (fp32 inside oneDNN) writes each chunk's product rounded once to bf16/fp16, by vocab blocks,
    each added into the fp32 buffer (torch has no CPU GEMM with an fp32 output from bf16 operands);
    elsewhere the GEMM runs in fp32.
    """
    lowp = dlogits_lp is not None and dlogits_lp.dtype == x.dtype and x.dtype in (torch.bfloat16, torch.float16)
    if lowp and dw32.dtype == torch.float32 and _mixed_gemm_ok(x.device, "addmm_acc"):
        torch.addmm(dw32, dlogits_lp.t(), x, out_dtype=torch.float32, out=dw32)
        return
    if lowp and _cpu_lowp_gemm(dlogits_lp, dw32.dtype):
        acc_t = dw32.t()  # the transposed accumulator's own [H, V] layout
        for b, product in _weight_grad_blocks(x, dlogits_lp):
            acc_t[:, b].add_(product)
        return
    dw32.addmm_(dlogits.t(), x.to(dw32.dtype))


def workspace(device: torch.device, nbuf: int, rows: int, vocab: int, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """Return `nbuf` [rows, V] buffers (fp32, or fp64 for fp64 inputs); on CPU cached per thread."""
    numel = nbuf * rows * vocab
    if device.type != "cpu" or dtype != torch.float32:
        return list(torch.empty(nbuf, rows, vocab, device=device, dtype=dtype).unbind(0))
    buf = getattr(_local, "cpu", None)
    if buf is None or buf.numel() < numel:
        _local.cpu = None
        buf = torch.empty(numel, dtype=torch.float32)
        _local.cpu = buf
    return [buf[i * rows * vocab : (i + 1) * rows * vocab].view(rows, vocab) for i in range(nbuf)]


def release_workspace() -> None:
    """Free the calling thread's cached CPU workspace (it is re-created on its next call).

    Other threads' workspaces are freed when those threads end.
    """
    _local.cpu = None


def default_chunk_rows(device: torch.device, nbuf: int, vocab: int, n_rows: int) -> int:
    """Rows per chunk so that `nbuf` fp32 [rows, V] buffers fit the device's workspace budget."""
    budget = DEFAULT_WORKSPACE_BYTES["cuda" if device.type == "cuda" else "cpu"]
    rows = budget // max(1, nbuf * vocab * 4)
    rows = max(16, min(8192, rows))
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, n_rows))
