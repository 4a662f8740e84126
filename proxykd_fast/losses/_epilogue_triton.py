"""Per-chunk loss epilogue in Triton, a drop-in for `torch_epilogue` in the chunk driver.

One kernel launch per chunk replaces the dozen [C, V] passes of the torch epilogue: it reads
the cuBLAS logits row by row in online-softmax form and writes dlogits over the student chunk.
Also home to the small host helpers every Triton strategy shares.
"""

from __future__ import annotations

import math
import os

import numpy
import torch
import triton
from torch import Tensor

from proxykd_fast.kernels.kd_epilogue import MODE_IDS, kd_epilogue_kernel

from ._epilogue_torch import torch_epilogue
from ._validation import KDOptions
from .chunked import Epilogue, buffers_needed

MIN_TRITON = (3, 6)


def _version() -> tuple[int, ...]:
    """(major, minor) of the installed triton."""
    return tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())


def unavailable_reason() -> str:
    """Why the Triton backends cannot run here ('' when they can)."""
    if _version() < MIN_TRITON:
        return f"triton>={'.'.join(map(str, MIN_TRITON))} is required, found {triton.__version__}"
    return ""


def interpreting() -> bool:
    """Whether kernels run in the Triton CPU interpreter (bf16 tl.dot must then be upcast)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_problem() -> str:
    """Why the kernels cannot run on CPU tensors in the Triton interpreter here ('' when they can)."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kd_epilogue_kernel, InterpretedFunction):
        return "the Triton kernels were imported before TRITON_INTERPRET=1 was set"
    try:
        int(numpy.array([1]))
    except TypeError:  # triton<3.7's interpreter int()s 1-element arrays for loop bounds
        if _version() < (3, 7):
            return (f"triton {triton.__version__}'s interpreter converts 1-element arrays with int(), which "
                    f"numpy {numpy.__version__} rejects; use triton>=3.7 or an older numpy")
    return ""


def epilogue_block(vocab: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row program over `vocab` columns (small blocks under the interpreter
    so tests walk several blocks and a masked tail)."""
    block = min(triton.next_power_of_2(vocab), 256 if interpreting() else 2048)
    return block, 8 if block >= 2048 else 4


def _mode(topk_ids: Tensor | None, opts: KDOptions) -> str:
    """The kernel mode for these options."""
    if opts.divergence is None:
        return "ce"
    return "offline" if topk_ids is not None else opts.divergence


def launch_epilogue(
    S: Tensor, P: Tensor | None, topk_ids: Tensor | None, topk_logprobs: Tensor | None, labels: Tensor,
    c_nll: Tensor, c_kd: Tensor | None, mode: str, temperature: float, beta: float, need_grad: bool,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Run the row epilogue over fp32 S [C, V]; returns (nll, kd or None); dlogits in S if need_grad."""
    c, vocab = S.shape
    nll = torch.empty(c, device=S.device, dtype=torch.float32)
    kd = None if mode == "ce" else torch.empty(c, device=S.device, dtype=torch.float32)
    if c == 0:
        return nll, kd
    assert S.dtype == torch.float32 and S.stride(1) == 1
    P_arg = S if P is None else P
    assert P_arg.dtype in (torch.float32, torch.bfloat16, torch.float16) and P_arg.stride(1) == 1
    k = 1 if topk_ids is None else topk_ids.shape[1]
    ids = labels if topk_ids is None else topk_ids.contiguous()
    lps = c_nll if topk_logprobs is None else topk_logprobs.to(torch.float32).contiguous()
    block, warps = epilogue_block(vocab)
    t = float(temperature)
    has_t = mode != "ce" and t != 1.0
    log_b = math.log(beta) if 0.0 < beta < 1.0 else 0.0
    log_1mb = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    c_kd_arg = c_nll if c_kd is None else c_kd.to(torch.float32).contiguous()
    kd_epilogue_kernel[(c,)](
        S, P_arg, S.stride(0), P_arg.stride(0),
        labels.contiguous(), ids, lps, k,
        c_nll.to(torch.float32).contiguous(), c_kd_arg, nll, nll if kd is None else kd,
        vocab, float(scale), 1.0 / t, t, float(beta), log_b, log_1mb,
        MODE=MODE_IDS[mode], NEED_GRAD=bool(need_grad), HAS_T=has_t,
        BLOCK=block, KP=triton.next_power_of_2(k), num_warps=warps,
    )
    return nll, kd


def triton_epilogue(
    S: Tensor,
    P: Tensor | None,
    R: Tensor | None,
    topk_ids: Tensor | None,
    topk_logprobs: Tensor | None,
    labels: Tensor,
    c_nll: Tensor,
    c_kd: Tensor,
    opts: KDOptions,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Same contract as `torch_epilogue` (R unused, P may also be bf16/fp16); fp64 goes to the torch epilogue."""
    if S.dtype != torch.float32 or (P is not None and P.dtype == torch.float64):
        return torch_epilogue(S, P, R, topk_ids, topk_logprobs, labels, c_nll, c_kd, opts, need_grad)
    mode = _mode(topk_ids, opts)
    return launch_epilogue(S, P, topk_ids, topk_logprobs, labels, c_nll, c_kd, mode, opts.temperature,
                           opts.jsd_beta, need_grad)


def _triton_buffers_needed(opts: KDOptions, online: bool, dtype: torch.dtype) -> int:
    """The kernel needs no scratch R: S, plus P when online (fp64 keeps the torch epilogue's count)."""
    if dtype != torch.float32:
        return buffers_needed(opts, online, dtype)
    return 2 if online and opts.divergence is not None else 1


triton_epilogue.buffers_needed = _triton_buffers_needed


def scaled_ce_epilogue(scale: float) -> Epilogue:
    """A CE epilogue on scale*logits whose dlogits include the chain-rule factor (tempered log-probs)."""

    def epilogue(S: Tensor, P: Tensor | None, R: Tensor | None, topk_ids: Tensor | None,
                 topk_logprobs: Tensor | None, labels: Tensor, c_nll: Tensor, c_kd: Tensor, opts: KDOptions,
                 need_grad: bool) -> tuple[Tensor, Tensor | None]:
        return launch_epilogue(S, None, None, None, labels, c_nll, None, "ce", 1.0, 0.5, need_grad, scale)

    return epilogue
