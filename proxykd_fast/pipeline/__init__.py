"""The Proxy-KD pipeline: align the proxy, precompute its targets, distill the student, evaluate."""

from .align import align_proxy
from .config import AlignProxyConfig, DistillConfig, EvalConfig, PrecomputeConfig, StageConfig, TrainConfig
from .distill import distill
from .evaluate import evaluate, heldout_kl, heldout_nll
from .modeling import PipelineError, apply_lora, check_same_vocab
from .precompute import precompute
from .targets import load_targets, sigmoid_weights

__all__ = [
    "AlignProxyConfig",
    "DistillConfig",
    "EvalConfig",
    "PipelineError",
    "PrecomputeConfig",
    "StageConfig",
    "TrainConfig",
    "align_proxy",
    "apply_lora",
    "check_same_vocab",
    "distill",
    "evaluate",
    "heldout_kl",
    "heldout_nll",
    "load_targets",
    "precompute",
    "sigmoid_weights",
]
