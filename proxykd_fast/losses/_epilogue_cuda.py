"""The row epilogue of the optional CUDA C++ extension (csrc/), with the torch epilogue for the rest.

The extension fuses NLL and online forward KL (any temperature) into two sweeps per row, for
fp32 logits on a CUDA device; every other mode (reverse KL, JSD, offline targets, tempered
log-probs) runs the torch epilogue inside the same chunk engine. csrc/README.md says why.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._epilogue_torch import TorchEpilogue
from ._spec import EpilogueArgs, LossSpec


def extension():
    """The compiled extension module (ImportError when it was not built)."""
    from proxykd_fast import _cuda_ext

    return _cuda_ext


def unavailable_reason() -> str:
    """Why the CUDA extension cannot be used here ('' when it can)."""
    try:
        ext = extension()
    except ImportError:
        return "the CUDA extension was not built (reinstall with PROXYKD_BUILD_CUDA=1 where nvcc is available)"
    if ext.device_count() == 0:
        return "no CUDA device is visible to the CUDA runtime"
    return ""


class CudaEpilogue(TorchEpilogue):
    """CE and online forward KL in the CUDA kernel; the torch epilogue's buffers and other modes."""

    name = "cuda"

    def serves(self, args: EpilogueArgs, spec: LossSpec) -> bool:
        """Whether the CUDA kernel handles this chunk (fp32, CUDA, unit column stride, CE or forward KL)."""
        S, P = args.S, args.P
        return (spec.mode in ("ce", "forward_kl") and spec.logit_scale == 1.0 and S.dtype == torch.float32
                and S.is_cuda and S.stride(1) == 1 and (P is None or P.stride(1) == 1))

    def __call__(self, args: EpilogueArgs, spec: LossSpec) -> tuple[Tensor, Tensor | None]:
        """Same contract as the torch epilogue."""
        if not self.serves(args, spec):
            return super().__call__(args, spec)
        S, P = args.S, args.P
        c = S.shape[0]
        with_proxy = spec.divergence is not None and P is not None
        ext = extension()
        out = ext.EpilogueArgs()
        nll = torch.empty(c, device=S.device, dtype=torch.float32)
        kd = torch.empty(c, device=S.device, dtype=torch.float32)
        labels = args.labels.contiguous()
        c_nll = args.c_nll.float().contiguous()
        c_kd = (args.c_nll if args.c_kd is None else args.c_kd).float().contiguous()
        out.S, out.P = S.data_ptr(), P.data_ptr() if with_proxy else 0
        out.labels, out.c_nll, out.c_kd, out.nll, out.kd = (labels.data_ptr(), c_nll.data_ptr(), c_kd.data_ptr(),
                                                            nll.data_ptr(), kd.data_ptr())
        out.C, out.V, out.ldS, out.ldP = c, S.shape[1], S.stride(0), P.stride(0) if with_proxy else 0
        out.temperature, out.need_grad = float(spec.temperature), bool(args.need_grad)
        ext.kd_epilogue(out, torch.cuda.current_stream(S.device).cuda_stream)
        return nll, kd if with_proxy else None
