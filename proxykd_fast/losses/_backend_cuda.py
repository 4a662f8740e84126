"""Backend 'cuda': the chunked driver with the CUDA C++ row epilogue from csrc/ (optional build).

The extension fuses NLL and forward KL (any temperature) into two sweeps per row; other
divergences, offline targets and fp64 fall back to the torch epilogue inside the same driver.
Log-probs and top-k use the torch chunked path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend_torch import linear_log_probs, linear_topk  # noqa: F401  (same chunked path)
from ._epilogue_torch import torch_epilogue
from ._validation import KDBatch, KDOptions
from .chunked import fused_linear_kd as _fused


def _extension():
    """The compiled extension module (ImportError when it was not built)."""
    from proxykd_fast import _cuda_ext

    return _cuda_ext


def unavailable_reason() -> str:
    """Why this backend cannot be used here ('' when it can)."""
    try:
        ext = _extension()
    except ImportError:
        return "the CUDA extension was not built (reinstall with PROXYKD_BUILD_CUDA=1 where nvcc is available)"
    if ext.device_count() == 0:
        return "no CUDA device is visible to the CUDA runtime"
    return ""


def cuda_epilogue(S: Tensor, P: Tensor | None, R: Tensor | None, topk_ids: Tensor | None,
                  topk_logprobs: Tensor | None, labels: Tensor, c_nll: Tensor, c_kd: Tensor, opts: KDOptions,
                  need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Same contract as `torch_epilogue`; CE and online forward KL run in the CUDA kernel."""
    fused = (topk_ids is None and opts.divergence in (None, "forward_kl") and S.dtype == torch.float32
             and S.is_cuda and S.stride(1) == 1 and (P is None or P.stride(1) == 1))
    if not fused:
        return torch_epilogue(S, P, R, topk_ids, topk_logprobs, labels, c_nll, c_kd, opts, need_grad)
    c, v = S.shape
    with_proxy = opts.divergence is not None and P is not None
    nll = torch.empty(c, device=S.device, dtype=torch.float32)
    kd = torch.empty(c, device=S.device, dtype=torch.float32)
    labels = labels.contiguous()
    c_nll = c_nll.float().contiguous()
    c_kd = c_kd.float().contiguous()
    _extension().kd_epilogue(
        S.data_ptr(), P.data_ptr() if with_proxy else 0, labels.data_ptr(), c_nll.data_ptr(), c_kd.data_ptr(),
        nll.data_ptr(), kd.data_ptr(), c, v, S.stride(0), P.stride(0) if with_proxy else 0,
        float(opts.temperature), bool(need_grad), torch.cuda.current_stream(S.device).cuda_stream,
    )
    return nll, kd if with_proxy else None


def fused_linear_kd(batch: KDBatch, opts: KDOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, nll_sum, kd_sum) through the chunked driver with the CUDA epilogue."""
    return _fused(batch, opts, cuda_epilogue)
