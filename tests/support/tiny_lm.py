"""Tiny causal LMs of several architectures built from configs (no Hub), for the integration tests."""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 48
SIZES = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCHS = ("llama", "qwen2", "gpt2", "gemma", "cohere", "granite")


def build(arch: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised fp32 causal LM of the given architecture, in eval mode (no dropout)."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "gpt2":  # tied head, `transformer` prefix, biased layers
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            **overrides)
        return tf.GPT2LMHeadModel(cfg).eval()
    kinds = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        # Gemma: tied head, embeddings scaled by sqrt(hidden) inside the backbone.
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 8}),
        # Logit scaling: Cohere multiplies the logits by logit_scale, Granite divides them by logits_scaling.
        "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {"logit_scale": 0.5}),
        "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, {"logits_scaling": 4.0}),
    }
    config_cls, model_cls, extra = kinds[arch]
    return model_cls(config_cls(**{**SIZES, **extra, **overrides})).eval()


def batch(rows: int = 3, width: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded ids with a masked prompt and padding: input_ids, attention_mask, labels (unshifted, HF style)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for r in range(rows):
        prompt, pad = 1 + r % 3, r % 2 * 2
        labels[r, :prompt] = -100
        if pad:
            ids[r, -pad:], mask[r, -pad:], labels[r, -pad:] = 0, 0, -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of the trainable parameters, cloned."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def doubled_logits_llama(config: Any) -> torch.nn.Module:
    """A Llama whose forward doubles its logits after the head: post-processing the fused losses cannot see."""
    from transformers import LlamaForCausalLM

    class Doubled(LlamaForCausalLM):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    return Doubled(config)
