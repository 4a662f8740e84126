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
    check_head_matches_logits(model, path)
    return model


SOFTCAPPING_KEYS = ("final_logit_softcapping", "attn_logit_softcapping_final")


def _configs(model: nn.Module) -> list[Any]:
    """The model's config and, when different, its (possibly nested) text config (e.g. Gemma-3's)."""
    cfg = getattr(_causal_lm(model), "config", None)
    if cfg is None:
        return []
    found = [cfg]
    nested = getattr(cfg, "text_config", None)
    get_text = getattr(cfg, "get_text_config", None)
    if nested is None and callable(get_text):
        try:
            nested = get_text()
        except (TypeError, ValueError):  # pragma: no cover - exotic configs
            nested = None
    if nested is not None and nested is not cfg:
        found.append(nested)
    return found


def check_supported(model: nn.Module) -> None:
    """Refuse models whose logits are not `hidden @ W.T + b` up to a scale (e.g. Gemma softcapping)."""
    for i, cfg in enumerate(_configs(model)):
        where = "text_config." if i else ""
        for name in SOFTCAPPING_KEYS:
            if getattr(cfg, name, None):
                raise PipelineError(
                    f"model config sets {where}{name}={getattr(cfg, name)}: the fused losses compute plain "
                    "hidden @ W.T logits and cannot apply tanh softcapping; this model is not supported"
                )
        scaling = getattr(cfg, "logits_scaling", None)
        if scaling is not None and not float(scaling) > 0:
            raise PipelineError(f"model config sets {where}logits_scaling={scaling}: expected a positive divisor")


def logit_scale(model: nn.Module) -> float:
    """The multiplier the model applies to its logits: Cohere's `logit_scale`, 1 / Granite's `logits_scaling`."""
    scale = 1.0
    for cfg in _configs(model):
        cohere = getattr(cfg, "logit_scale", None)
        granite = getattr(cfg, "logits_scaling", None)
        if cohere is not None:
            scale *= float(cohere)
        if granite is not None:
            scale /= float(granite)
    return scale


@torch.no_grad()
def check_head_matches_logits(model: nn.Module, name: str = "model") -> None:
    """Run 4 tokens through the model and refuse it if its logits are not what the fused losses compute."""
    was_training = model.training
    model.eval()
    head, bias = head_params(model)
    device = head.device
    ids = torch.arange(1, 5, device=device).clamp_max(head.shape[0] - 1)[None]
    mask = torch.ones_like(ids)
    try:
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    hidden, w, b = HiddenAndHead(model)(ids, mask)
    got = hidden.float() @ w.float().t() + (0 if b is None else b.float())
    tol = (1e-3 if head.dtype in (torch.float32, torch.float64) else 5e-2) * (1 + float(want.abs().max()))
    err = float((got - want).abs().max())
    if not err <= tol:
        raise PipelineError(
            f"{name}: the model's logits differ from backbone hidden @ lm_head.weight.T (max error {err:.3g}): "
            "it post-processes its logits in a way the fused losses do not reproduce; this model is not supported"
        )


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
    fused losses then read the head without any [tokens x vocab] logits. With `autocast` (e.g.
    torch.bfloat16) the backbone runs under torch.autocast and its hidden states come back in the
    head's dtype, so the fused losses and the head stay in the weights' precision.
    """

    def __init__(self, model: nn.Module, autocast: torch.dtype | None = None) -> None:
        super().__init__()
        check_supported(model)
        self.model = model
        self.autocast = autocast

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Backbone hidden states (scaled by logit_scale) and the head parameters."""
        weight, bias = head_params(self.model)
        if self.autocast is None:
            out = backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            with torch.autocast(device_type=input_ids.device.type, dtype=self.autocast):
                out = backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        if self.autocast is not None:
            hidden = hidden.to(weight.dtype)
        scale = logit_scale(self.model)
        if scale != 1.0:
            hidden = hidden * scale
        return hidden, weight, bias


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
