"""Drop-in integrations with the trainers people already use: Hugging Face models and TRL.

`proxykd_fast.integrations.hf`: a fused head for any causal LM (`fuse_lm_head`, `hidden_and_head`).
`proxykd_fast.integrations.trl`: `ProxyKDTrainer` (SFTTrainer) and `ProxyDPOTrainer` (DPOTrainer).
"""

from .hf import UnsupportedModelError, fuse_lm_head, hidden_and_head, unfuse_lm_head

__all__ = ["UnsupportedModelError", "fuse_lm_head", "hidden_and_head", "unfuse_lm_head"]
