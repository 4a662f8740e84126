"""The row epilogue in Triton (one kernel launch per chunk), and its per-token form for DPO.

One launch replaces the dozen [C, V] passes of the torch epilogue: the kernel reads the cuBLAS
logits row by row in online-softmax form and writes dlogits over the student chunk, with no
scratch buffer. fp32 logits only: the backend registry sends fp64 inputs to the torch backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from proxykd_fast.ops.kd_epilogue import launch_kd_epilogue

from ._spec import EpilogueArgs, LossSpec


class TritonEpilogue:
    """The `RowEpilogue` as one Triton kernel per chunk (kernels/kd_epilogue.py), every mode."""

    name = "triton"

    def buffers(self, spec: LossSpec, online: bool, dtype: torch.dtype) -> int:
        """The kernel needs no scratch R: S, plus P when online."""
        return 2 if online and spec.divergence is not None else 1

    def __call__(self, args: EpilogueArgs, spec: LossSpec) -> tuple[Tensor, Tensor | None]:
        """(nll [C], kd [C] or None); with args.need_grad, dlogits in args.S (P may be bf16/fp16)."""
        return launch_kd_epilogue(args, spec)


_CE = LossSpec()


class TritonTokenRows:
    """Per-token DPO steps on the CE mode of the row kernel: S stays the logits until `dlogits`."""

    def logps(self, S: Tensor, labels: Tensor) -> Tensor:
        """-NLL per row, S untouched."""
        zeros = torch.zeros(S.shape[0], device=S.device, dtype=torch.float32)
        nll, _ = launch_kd_epilogue(EpilogueArgs(S, None, None, labels, None, None, zeros, None, False), _CE)
        return -nll

    def dlogits(self, S: Tensor, labels: Tensor, coef: Tensor) -> None:
        """The CE gradient c_nll * (softmax - onehot) with c_nll = -coef, written over S."""
        launch_kd_epilogue(EpilogueArgs(S, None, None, labels, None, None, (-coef).float(), None, True), _CE)
