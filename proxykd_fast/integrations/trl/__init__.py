"""TRL trainers on Proxy-KD's fused losses: `ProxyKDTrainer` (SFTTrainer) and `ProxyDPOTrainer` (DPOTrainer).

One import and one class swap: `SFTTrainer` -> `ProxyKDTrainer` (with a proxy model or precomputed
top-k targets), `DPOTrainer` -> `ProxyDPOTrainer`. `align_proxy` runs the paper's proxy alignment
(SFT warm-up, then rounds of NLL + DPO against the proxy's own samples) on the two.
"""

from .data import ProxyTargetsCollator, align_topk, load_precomputed
from .dpo import ProxyDPOConfig, ProxyDPOTrainer
from .kd import ProxyKDConfig, ProxyKDTrainer
from .recipe import align_proxy, sample_completions

__all__ = [
    "ProxyDPOConfig", "ProxyDPOTrainer", "ProxyKDConfig", "ProxyKDTrainer", "ProxyTargetsCollator", "align_proxy",
    "align_topk", "load_precomputed", "sample_completions",
]
