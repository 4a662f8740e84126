"""Roofline model of each loss on Hopper, from the same FLOP counts the suite uses plus the epilogue's bytes.

Time = GEMM FLOPs / peak dense bf16 tensor rate + epilogue bytes / HBM bandwidth: in the chunked
schedule the logits epilogue is a memory-bound pass between the GEMMs, not overlapped with them.
The GEMMs' own operand and dW-accumulator traffic is overlapped (their arithmetic intensity is
about a thousand FLOP per byte at these shapes) and not counted.

Epilogue bytes per logit (chunked: the logits GEMM writes fp32, the epilogue reads them and
writes bf16 dlogits that the dX / dW GEMMs read): a differentiated head 4 + 4 + 2 = 10 B, a
no-grad head (online proxy or reference, top-k) 4 + 4 = 8 B.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import LOSSES, gemm_flops

# Dense bf16 tensor-core peak (no sparsity) and HBM bandwidth, SXM parts (NVIDIA datasheets).
GPUS = {"H100": (989.4e12, 3.35e12), "H200": (989.4e12, 4.8e12)}
TARGET = (16384, 4096, 128256)  # N, H, V: the project's GPU target shape, bf16
GRAD_HEAD_BYTES, NOGRAD_HEAD_BYTES = 10, 8


def epilogue_bytes(loss: str, n: int, v: int) -> float:
    """HBM bytes the logits epilogue moves for `loss` over n scored rows."""
    if loss == "topk":
        return NOGRAD_HEAD_BYTES * n * v
    extra = NOGRAD_HEAD_BYTES if loss in ("kd_online", "dpo_online") else 0
    return (GRAD_HEAD_BYTES + extra) * n * v


@dataclass(frozen=True)
class Prediction:
    loss: str
    gpu: str
    flops: float
    bytes: float
    gemm_s: float
    epilogue_s: float

    @property
    def total_s(self) -> float:
        return self.gemm_s + self.epilogue_s

    @property
    def effective_tflops(self) -> float:
        """GEMM FLOPs over the predicted time: the figure a measured run would report."""
        return self.flops / self.total_s / 1e12


def predict(loss: str, gpu: str, n: int = TARGET[0], h: int = TARGET[1], v: int = TARGET[2]) -> Prediction:
    """Predicted time of one forward (+ backward) of `loss` on `gpu` at [n, h] x [v, h], bf16."""
    peak, bw = GPUS[gpu]
    flops = gemm_flops(loss, n, h, v)
    nbytes = epilogue_bytes(loss, n, v)
    return Prediction(loss, gpu, flops, nbytes, flops / peak, nbytes / bw)


def table() -> list[Prediction]:
    """Every loss on every modelled GPU at the target shape."""
    return [predict(loss, gpu) for loss in LOSSES for gpu in GPUS]
