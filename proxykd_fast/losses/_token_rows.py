"""Per-token epilogues of a logits chunk for sequence-level losses (DPO): log p[y] and dlogits.

A chunk's fp32 logits `S` [C, V] first give each token's log-prob of its label; once the
sequence-level coefficients `c` are known, `S` is overwritten in place with
d loss / d logits = c * (onehot(y) - softmax(S)). The torch form keeps the log-softmax in `S`
between the two calls; the Triton form leaves the logits there and re-reads them (one kernel
per call, the CE mode of the chunked epilogue).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class TokenRows(Protocol):
    """The two per-chunk steps of a sequence-level loss."""

    def logps(self, S: Tensor, labels: Tensor) -> Tensor:
        """log softmax(S)[y] per row (may transform S for `dlogits`)."""

    def dlogits(self, S: Tensor, labels: Tensor, coef: Tensor) -> None:
        """Overwrite S with coef * (onehot(y) - softmax) after `logps` ran on it."""


class TorchTokenRows:
    """Plain torch: log-softmax in place, then exp / scale / scatter."""

    def logps(self, S: Tensor, labels: Tensor) -> Tensor:
        """Leave log softmax(S) in S and gather the labels' entries."""
        torch.log_softmax(S, 1, out=S)
        return S.gather(1, labels[:, None]).view(-1)

    def dlogits(self, S: Tensor, labels: Tensor, coef: Tensor) -> None:
        """S holds log-probs: S = coef * (onehot - exp(S))."""
        S.exp_().mul_((-coef)[:, None])
        S.scatter_add_(1, labels[:, None], coef[:, None])


class TritonTokenRows:
    """The Triton row epilogue (CE mode): one streaming kernel per step, S stays the logits until `dlogits`."""

    def logps(self, S: Tensor, labels: Tensor) -> Tensor:
        """-NLL per row, S untouched."""
        from ._epilogue_triton import launch_epilogue

        zeros = torch.zeros(S.shape[0], device=S.device, dtype=torch.float32)
        nll, _ = launch_epilogue(S, None, None, None, labels, zeros, None, "ce", 1.0, 0.5, False)
        return -nll

    def dlogits(self, S: Tensor, labels: Tensor, coef: Tensor) -> None:
        """The CE gradient c_nll * (softmax - onehot) with c_nll = -coef, written over S."""
        from ._epilogue_triton import launch_epilogue

        launch_epilogue(S, None, None, None, labels, (-coef).float(), None, "ce", 1.0, 0.5, True)


CHUNKED_TRITON = ("_backend_triton", "_backend_triton_chunked")


def token_rows_for(backend_module: str, dtype: torch.dtype) -> TokenRows | None:
    """The chunked token epilogue for a backend module, or None where the backend has no chunked form.

    'reference' (the oracle) and the tile-fused Triton strategy (which never holds a logits chunk)
    return None; fp64 chunks always take the torch form.
    """
    name = backend_module.rsplit(".", 1)[-1]
    if name in CHUNKED_TRITON:
        return TorchTokenRows() if dtype == torch.float64 else TritonTokenRows()
    if name in ("_backend_torch", "_backend_cuda"):
        return TorchTokenRows()
    return None
