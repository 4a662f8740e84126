"""Model utilities: load causal LMs, get backbone hidden states and the head for the fused losses."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class PipelineError(RuntimeError):
    """A configuration or model that the pipeline refuses, with a message that says why."""


def load_tokenizer(path: str) -> Any:
    """Load a tokenizer and make sure it has a pad token (pad = eos when missing)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise PipelineError(f"tokenizer at {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, dtype: str = "float32") -> nn.Module:
    """Load an `AutoModelForCausalLM` and check that the fused losses can reproduce its logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    check_supported(model)
    return model


def check_supported(model: nn.Module) -> None:
    """Refuse models whose logits are not `hidden @ W.T + b` up to a scale (e.g. Gemma softcapping)."""
    cfg = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "attn_logit_softcapping_final"):
        if getattr(cfg, name, None):
            raise PipelineError(
                f"model config sets {name}={getattr(cfg, name)}: the fused losses compute plain "
                "hidden @ W.T logits and cannot apply tanh softcapping; this model is not supported"
            )


def logit_scale(model: nn.Module) -> float:
    """The multiplier applied to the logits by the model (Cohere `logit_scale`), 1.0 for most models."""
    cfg = getattr(_unwrap(model), "config", None)
    scale = getattr(cfg, "logit_scale", None)
    return 1.0 if scale is None else float(scale)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / accelerate / compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM under a peft wrapper, if any."""
    model = _unwrap(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack that returns the last hidden state (before the lm_head)."""
    lm = _causal_lm(model)
    get_decoder = getattr(lm, "get_decoder", None)
    dec = get_decoder() if callable(get_decoder) else None
    if dec is None:
        dec = getattr(lm, lm.base_model_prefix, None) if hasattr(lm, "base_model_prefix") else None
    if dec is None or dec is lm:
        raise PipelineError(f"cannot find the backbone of {type(lm).__name__}")
    return dec


def head_params(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The lm_head weight [V, H] and bias (or None); with tied embeddings this is the embedding."""
    head = _causal_lm(model).get_output_embeddings()
    if head is None:
        raise PipelineError("model has no output embeddings (lm_head)")
    base = getattr(head, "base_layer", head)
    if hasattr(head, "lora_A"):
        raise PipelineError("LoRA on lm_head is not supported: the fused loss reads the head weight directly")
    return base.weight, getattr(base, "bias", None)


def vocab_size(model: nn.Module) -> int:
    """Number of rows of the output head."""
    return int(head_params(model)[0].shape[0])


class HiddenAndHead(nn.Module):
    """Wrap a causal LM so that forward returns (last hidden state, head weight, head bias).

    Training calls go through this module's forward, so DDP/accelerate hooks fire, and the
    fused losses then read the head without any [tokens x vocab] logits.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Backbone hidden states (scaled by logit_scale) and the head parameters."""
        out = backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        scale = logit_scale(self.model)
        if scale != 1.0:
            hidden = hidden * scale
        weight, bias = head_params(self.model)
        return hidden, weight, bias


def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Last hidden state of the backbone (scaled by logit_scale) for a plain or wrapped model."""
    if isinstance(_unwrap(model), HiddenAndHead):
        return model(input_ids, attention_mask)[0]
    return HiddenAndHead(_unwrap(model))(input_ids, attention_mask)[0]


def check_same_vocab(a: Any, b: Any, names: tuple[str, str] = ("proxy", "student")) -> None:
    """Refuse two tokenizers / models whose vocabularies differ (top-k ids would be meaningless)."""

    def describe(x: Any) -> tuple[int, dict[str, int] | None]:
        if isinstance(x, nn.Module):
            return vocab_size(x), None
        return len(x), x.get_vocab()

    na, va = describe(a)
    nb, vb = describe(b)
    if va is not None and vb is not None and va != vb:
        only = sorted(set(va) ^ set(vb))[:5]
        raise PipelineError(
            f"{names[0]} and {names[1]} tokenizers differ ({na} vs {nb} tokens; e.g. {only}): "
            "Proxy-KD needs one shared vocabulary"
        )
    if va is None or vb is None:
        if na != nb:
            raise PipelineError(
                f"{names[0]} and {names[1]} vocabularies differ in size ({na} vs {nb}): "
                "Proxy-KD needs one shared vocabulary"
            )


def check_model_matches_tokenizer(model: nn.Module, tokenizer: Any, name: str) -> None:
    """The head must cover every token id of the tokenizer."""
    if vocab_size(model) < len(tokenizer):
        raise PipelineError(f"{name} head has {vocab_size(model)} rows but the tokenizer has {len(tokenizer)} tokens")


def apply_lora(model: nn.Module, lora: dict[str, Any] | None) -> nn.Module:
    """Wrap `model` with peft LoRA adapters when `lora` is set; refuse adapters on the lm_head."""
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    cfg = dict(lora)
    targets = cfg.get("target_modules", "all-linear")
    names = [targets] if isinstance(targets, str) else list(targets)
    head_names = {"lm_head", "embed_out", "output"}
    if any(n in head_names for n in names) or "lm_head" in (cfg.get("modules_to_save") or []):
        raise PipelineError(
            "LoRA on lm_head is refused: the fused losses read the head weight directly, so an adapter "
            "there would get no gradient; target the attention/MLP projections instead"
        )
    cfg.setdefault("target_modules", "all-linear")
    cfg.setdefault("task_type", "CAUSAL_LM")
    peft_model = get_peft_model(model, LoraConfig(**cfg))
    head_params(peft_model)  # raises if peft still put an adapter on the head
    return peft_model


def save_model(model: nn.Module, tokenizer: Any, path: str) -> None:
    """Save a model loadable by `AutoModelForCausalLM.from_pretrained` (LoRA adapters are merged)."""
    lm = _unwrap(model)
    if isinstance(lm, HiddenAndHead):
        lm = lm.model
    if hasattr(lm, "merge_and_unload"):
        import copy

        lm = copy.deepcopy(lm).merge_and_unload()
    lm.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
