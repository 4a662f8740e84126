"""Fused linear-head losses for black-box distillation: CE, log-probs, top-k, Proxy-KD, DPO.

Each loss reads hidden states and the lm_head weight and never materializes the full
[tokens x vocab] logits; backends: "reference" (oracle), "torch" (chunked), "triton", "cuda".
"""

from ._gemm import release_workspace
from .backends import BACKENDS, Backend, available_backends
from .dpo import dpo_loss
from .functional import linear_cross_entropy, linear_log_probs, linear_topk, proxy_kd_loss
from .modules import LinearCrossEntropyLoss, ProxyKDLoss
from .sequence import sequence_log_probs

__all__ = [
    "BACKENDS",
    "Backend",
    "LinearCrossEntropyLoss",
    "ProxyKDLoss",
    "available_backends",
    "dpo_loss",
    "linear_cross_entropy",
    "linear_log_probs",
    "linear_topk",
    "proxy_kd_loss",
    "release_workspace",
    "sequence_log_probs",
]
