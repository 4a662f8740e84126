"""Model utilities: load causal LMs, get backbone hidden states and the head for the fused losses."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from proxykd_fast.integrations import hf


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


def load_model(path: str, dtype: str = "float32", attn_implementation: str = "sdpa", meta: bool = False) -> nn.Module:
    """Load an `AutoModelForCausalLM` and check that the fused losses can reproduce its logits.

    `meta`: build it from its config on the meta device instead (no weights read; what FSDP's non-main ranks do
    before the main one broadcasts its weights), so only the config-level checks run.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_attn_implementation(attn_implementation)
    if meta:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),
                                                     attn_implementation=attn_implementation)
        check_supported(model)
        return model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                 attn_implementation=attn_implementation)
    check_supported(model)
    check_head_matches_logits(model, path)
    return model


def check_attn_implementation(name: str) -> None:
    """Refuse an attention implementation this machine cannot run, before any model is loaded."""
    if name != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        raise PipelineError(
            "--attn-implementation flash_attention_2 needs the flash-attn package (pip install flash-attn) and a "
            "CUDA GPU, which this machine does not have: use sdpa (the default) or eager")


def _pipeline_errors(fn: Any) -> Any:
    """Re-raise the integration's UnsupportedModelError as a PipelineError (what the CLI reports)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except hf.UnsupportedModelError as e:
            raise PipelineError(str(e)) from e

    return wrapped


# One implementation, in proxykd_fast.integrations.hf (the public API); these names keep the pipeline's.
check_supported = _pipeline_errors(hf.check_supported)
check_head_matches_logits = _pipeline_errors(hf.check_head_matches_logits)
head_params = _pipeline_errors(hf.head_params)
vocab_size = _pipeline_errors(hf.vocab_size)
logit_scale = hf.logit_scale
_unwrap = hf.unwrap
causal_lm = hf.causal_lm
_hidden_and_head = _pipeline_errors(hf.hidden_and_head)


class HiddenAndHead(nn.Module):
    """Wrap a causal LM so that forward returns (last hidden state, head weight, head bias), or runs a loss on them.

    The hidden states come from the model's own forward (`integrations.hf.hidden_and_head`), so its
    hooks apply; the losses read the head without any [tokens x vocab] logits. Training calls pass
    `head_fn`, which runs inside the head's call: DDP's hooks fire, and under FSDP2 (this module is
    the root unit, holding the embeddings and the head) the head weight is the gathered one and FSDP
    reduce-scatters its gradient itself. With `autocast` (e.g. torch.bfloat16) the model runs under
    torch.autocast and the hidden states, head weight and bias reach the loss in that dtype, as
    autocast would run the head's matmul (the loss accumulates in fp32; the fp32 master weight gets
    the gradient). With `packing` the batch's samples run concatenated (see `pack_batch`) and the
    hidden states come back in the batch's padded layout.
    """

    def __init__(self, model: nn.Module, autocast: torch.dtype | None = None, packing: bool = False) -> None:
        super().__init__()
        check_supported(model)
        self.model = model
        self.autocast = autocast
        self.packing = packing

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                head_fn: Callable[[Tensor, Tensor, Tensor | None], Any] | None = None) -> Any:
        """Hidden states (scaled by logit_scale) and the head parameters, or `head_fn` of them."""
        ids, mask, keep, kwargs = input_ids, attention_mask, None, {}
        if self.packing and attention_mask is not None and input_ids.shape[0] > 1:
            ids, positions, keep = pack_batch(input_ids, attention_mask)
            mask, kwargs = None, {"position_ids": positions}

        def fn(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Any:
            if keep is not None:
                hidden = unpack_hidden(hidden, keep)
            return (hidden, weight, bias) if head_fn is None else head_fn(hidden, weight, bias)

        if self.autocast is None:
            return _hidden_and_head(self.model, ids, mask, fn=fn, **kwargs)
        with torch.autocast(device_type=input_ids.device.type, dtype=self.autocast):
            return _hidden_and_head(self.model, ids, mask, fn=fn, head_dtype="autocast", **kwargs)

    def generate(self, **kwargs: Any) -> Any:
        """The wrapped model's `generate` (registered as a forward method under FSDP, so the root is gathered)."""
        if self.autocast is None:
            return self.model.generate(**kwargs)
        with torch.autocast(device_type=kwargs["input_ids"].device.type, dtype=self.autocast):
            return self.model.generate(**kwargs)


def pack_batch(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(ids [1, N], position ids [1, N] restarting at 0 in every sample, keep mask [B, T]) of a padded batch.

    The N = attention_mask.sum() real tokens of the rows are concatenated row after row; with position
    ids and no attention mask, transformers builds a block-diagonal causal mask (sdpa, eager) or runs
    the varlen kernels (flash_attention_2), so no token attends across a sample boundary.
    """
    keep = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return input_ids[keep][None], positions[keep][None], keep


def unpack_hidden(packed: Tensor, keep: Tensor) -> Tensor:
    """The packed hidden states [1, N, H] back in the batch's padded layout [B, T, H] (zeros at padding)."""
    out = packed.new_zeros((*keep.shape, packed.shape[-1]))
    return out.masked_scatter(keep[..., None], packed[0])


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
