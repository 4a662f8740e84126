"""A fused linear head for any Hugging Face causal LM: the loss without the [tokens x vocab] logits.

The model's own forward runs unchanged (so autocast, accelerate/DDP/FSDP/ZeRO hooks, PEFT, gradient
checkpointing and any pre-head processing all apply); only the call of its output-embedding module
(`get_output_embeddings()`, the `lm_head`) is intercepted. Inside that call the head's weight is the
one the wrappers materialise (FSDP2 and ZeRO-3 gather it for the module's forward), so the loss is
computed right there and the module returns an empty placeholder instead of logits.

- `hidden_and_head(model, input_ids, attention_mask)` -> (hidden, weight, bias), hidden already
  multiplied by the model's logit scale: `hidden @ weight.T + bias` are the model's logits. With
  `fn=`, `fn(hidden, weight, bias)` runs inside the head's call and its result is returned.
- `fuse_lm_head(model)`: `model(input_ids, attention_mask=..., labels=labels)` then returns the
  causal-LM loss (HF's label shift, ignore_index=-100, `num_items_in_batch`) from the fused CE, with
  `logits=None`; without labels the forward is the original one, so generation is unchanged.

Logits must be `(hidden @ W.T + b) * s` for a constant s read from the config (Cohere's `logit_scale`,
Granite's `logits_scaling`, Falcon-H1's `lm_head_multiplier`); tanh softcapping (Gemma-2/3) is refused.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from proxykd_fast.losses import BACKENDS, linear_cross_entropy

IGNORE_INDEX = -100
SOFTCAPPING_KEYS = ("final_logit_softcapping", "attn_logit_softcapping_final")
_FUSED_ATTR = "_proxykd_fused_head"

HeadFn = Callable[[Tensor, Tensor, "Tensor | None"], Any]


class UnsupportedModelError(ValueError):
    """A model whose logits the fused losses cannot reproduce, with a message that says why."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / accelerate / compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)  # torch.compile
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM under DDP / compile / PEFT wrappers."""
    model = unwrap(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _configs(model: nn.Module) -> list[Any]:
    """The model's config and, when different, its (possibly nested) text config (e.g. Gemma-3's)."""
    cfg = getattr(causal_lm(model), "config", None)
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
    """Refuse models whose logits are not `hidden @ W.T + b` up to a constant scale (e.g. Gemma softcapping)."""
    for i, cfg in enumerate(_configs(model)):
        where = "text_config." if i else ""
        for name in SOFTCAPPING_KEYS:
            if getattr(cfg, name, None):
                raise UnsupportedModelError(
                    f"model config sets {where}{name}={getattr(cfg, name)}: the fused losses compute plain "
                    "hidden @ W.T logits and cannot apply tanh softcapping; this model is not supported"
                )
        scaling = getattr(cfg, "logits_scaling", None)
        if scaling is not None and not float(scaling) > 0:
            raise UnsupportedModelError(
                f"model config sets {where}logits_scaling={scaling}: expected a positive divisor")


def logit_scale(model: nn.Module) -> float:
    """The constant the model multiplies its logits by (1 for most models).

    Cohere's `logit_scale`, Falcon-H1's `lm_head_multiplier`, 1 / Granite's `logits_scaling`
    (HyperCLOVA X multiplies by it instead).
    """
    scale = 1.0
    for cfg in _configs(model):
        for key in ("logit_scale", "lm_head_multiplier"):
            value = getattr(cfg, key, None)
            if value is not None:
                scale *= float(value)
        granite = getattr(cfg, "logits_scaling", None)
        if granite is not None:
            scale = scale * float(granite) if getattr(cfg, "model_type", None) == "hyperclovax" else scale / float(granite)
    return scale


def output_head(model: nn.Module) -> nn.Module:
    """The module that turns the last hidden state into logits (`get_output_embeddings()`)."""
    lm = causal_lm(model)
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise UnsupportedModelError(f"{type(lm).__name__} has no output embeddings (lm_head)")
    if hasattr(head, "lora_A") or hasattr(head, "modules_to_save"):
        raise UnsupportedModelError(
            "a PEFT adapter on lm_head is not supported: the fused loss reads the head weight directly, so the "
            "adapter would get no gradient; target the attention/MLP projections instead"
        )
    return head


def head_params(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The lm_head weight [V, H] and bias (or None) as registered now; with tied embeddings this is the embedding."""
    head = output_head(model)
    base = getattr(head, "base_layer", head)
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise UnsupportedModelError(f"the output head {type(head).__name__} has no 2-D weight")
    return weight, getattr(base, "bias", None)


def vocab_size(model: nn.Module) -> int:
    """Number of rows of the output head."""
    return int(head_params(model)[0].shape[0])


class _HeadCall:
    """Stands in for the head module's forward: hands (scaled hidden, weight, bias) to `fn` and keeps its result."""

    def __init__(self, head: nn.Module, fn: HeadFn, scale: float, head_dtype: str = "autocast") -> None:
        self.head, self.fn, self.scale, self.head_dtype = head, fn, scale, head_dtype
        self.calls = 0
        self.result: Any = None

    def __call__(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        if self.calls > 1:
            raise UnsupportedModelError(
                f"the model called its output head {type(self.head).__name__} more than once in one forward; "
                "the fused head supports one call per forward")
        base = getattr(self.head, "base_layer", self.head)
        weight, bias = base.weight, getattr(base, "bias", None)
        if self.scale != 1.0:
            hidden = hidden * self.scale
            bias = None if bias is None else bias * self.scale
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            if self.head_dtype == "weight":  # the head in its weights' precision (e.g. fp32 master weights)
                hidden = hidden.to(weight.dtype)
            else:  # what autocast would do to the head's matmul, once, so the loss kernels see plain tensors
                dtype = torch.get_autocast_dtype(device)
                hidden, weight = hidden.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            with torch.autocast(device, enabled=False):
                self.result = self.fn(hidden, weight, bias)
        else:
            self.result = self.fn(hidden, weight, bias)
        return hidden.new_zeros((*hidden.shape[:-1], 0))  # the "logits" the model goes on with


HEAD_DTYPES = ("autocast", "weight")


def _check_head_dtype(head_dtype: str) -> None:
    if head_dtype not in HEAD_DTYPES:
        raise ValueError(f"head_dtype must be one of {HEAD_DTYPES}, got {head_dtype!r}")


@contextmanager
def _intercepted_head(model: nn.Module, fn: HeadFn, head_dtype: str = "autocast") -> Iterator[_HeadCall]:
    """Within the block, calls of the model's output head run `fn` instead of the projection."""
    _check_head_dtype(head_dtype)
    check_supported(model)
    head = output_head(model)
    # accelerate's device-map hooks live in `forward` and call `_old_forward`: replace the latter to keep them.
    attr = "_old_forward" if hasattr(head, "_hf_hook") and "_old_forward" in head.__dict__ else "forward"
    had = attr in head.__dict__
    previous = head.__dict__.get(attr)
    call = _HeadCall(head, fn, logit_scale(model), head_dtype)
    setattr(head, attr, call)
    try:
        yield call
    finally:
        if had:
            setattr(head, attr, previous)
        else:
            delattr(head, attr)
    if call.calls == 0:
        raise UnsupportedModelError(
            f"{type(causal_lm(model)).__name__}'s forward never called its output head {type(head).__name__} "
            "(it uses the head weight directly): the fused head cannot intercept it; this model is not supported"
        )


def _float_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return hidden.float() @ weight.float().t() + (0 if bias is None else bias.float())


def _captured(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    return hidden, weight, bias


def hidden_and_head(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *, fn: HeadFn | None = None,
    head_dtype: str = "autocast", **model_kwargs: Any,
) -> Any:
    """(hidden [B, T, H] times the logit scale, head weight [V, H], bias or None) from the model's own forward.

    `model` may be wrapped (DDP, accelerate, FSDP2, PEFT): it is called as a whole, so hooks and
    autocast apply. With `fn`, returns `fn(hidden, weight, bias)` evaluated inside the head module's
    call, where FSDP2 / ZeRO-3 have gathered the weight: use it when the head is sharded on its own.
    Under autocast, `head_dtype="autocast"` hands over hidden and weight in the autocast dtype (what
    the model's own head matmul would see); "weight" keeps the weight and casts hidden to its dtype.
    """
    with _intercepted_head(model, fn or _captured, head_dtype) as call:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    return call.result


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """HF's causal shift: position t is scored on labels[t + 1]; the last position is ignored."""
    if labels.dim() < 1 or labels.shape[-1] == 0:
        raise ValueError(f"labels must be [..., T] with T >= 1, got shape {tuple(labels.shape)}")
    pad = labels.new_full((*labels.shape[:-1], 1), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def _check_options(backend: str, chunk_size: int | None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _without_logits(out: Any, loss: Tensor) -> Any:
    """The model's output with `loss` set and the placeholder logits dropped (same output class)."""
    fields = {k: v for k, v in out.items() if k not in ("logits", "loss")}
    return type(out)(loss=loss, **fields)


def _original_forward(model: nn.Module) -> Callable[..., Any]:
    """The forward the fused one stands in for (an earlier instance-level wrapper, or the class's)."""
    kept = model.__dict__[_FUSED_ATTR]["forward"]
    return kept if kept is not None else types.MethodType(type(model).forward, model)


def _fused_forward() -> Callable[..., Any]:
    """A forward that computes the CE loss inside the head's call when labels are given, else the original.

    Its state lives on the model (not in a closure), so `copy.deepcopy(model)` gives a copy that runs itself.
    """

    def forward(self: nn.Module, *args: Any, labels: Tensor | None = None, num_items_in_batch: Any = None,
                **kwargs: Any) -> Any:
        state = self.__dict__[_FUSED_ATTR]
        backend, chunk_size, original = state["backend"], state["chunk_size"], _original_forward(self)
        head_dtype = state["head_dtype"]
        targets = kwargs.pop("shift_labels", None)  # pre-shifted labels (context/sequence parallel collators)
        if labels is None and targets is None:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original(*args, **kwargs)
        if targets is None:
            targets = shift_labels(labels)

        def loss_fn(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            if tuple(hidden.shape[:-1]) != tuple(targets.shape):
                raise ValueError(f"labels have shape {tuple(targets.shape)} but the head saw hidden states "
                                 f"{tuple(hidden.shape)}; expected labels shaped like input_ids")
            return linear_cross_entropy(hidden, weight, targets.to(hidden.device), bias=bias,
                                        ignore_index=IGNORE_INDEX, num_items_in_batch=num_items_in_batch,
                                        chunk_size=chunk_size, backend=backend)

        as_tuple = kwargs.get("return_dict") is False
        kwargs.update(use_cache=False, return_dict=True)
        kwargs.pop("logits_to_keep", None)  # every position is scored
        with _intercepted_head(self, loss_fn, head_dtype) as call:
            out = original(*args, **kwargs)
        loss = call.result
        aux = out.get("aux_loss") if hasattr(out, "get") else None
        if aux is not None:  # MoE: the model adds its load-balancing loss only when it computes the loss itself
            coef = max((getattr(c, "router_aux_loss_coef", 0.0) or 0.0) for c in _configs(self))
            loss = loss + coef * aux.to(loss.device)
        out = _without_logits(out, loss)
        return out.to_tuple() if as_tuple else out

    return forward


def fuse_lm_head(model: nn.Module, *, backend: str = "auto", chunk_size: int | None = None,
                 head_dtype: str = "autocast", verify: bool = True) -> nn.Module:
    """Make `model(..., labels=labels)` return the fused CE loss (logits=None); returns `model` itself.

    Works on the plain causal LM or a PEFT-wrapped one (the underlying transformers model is
    patched), before or after `Trainer` / accelerate wraps it. `head_dtype="weight"` keeps the head in
    its weights' precision under autocast (TRL's `cast_lm_head_to_fp32`). `verify` runs 4 tokens
    through the model once and refuses it if its logits are not `hidden @ W.T` up to the configured scale.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_options(backend, chunk_size)
    _check_head_dtype(head_dtype)
    lm = causal_lm(model)
    check_supported(lm)
    output_head(lm)
    if verify:
        check_head_matches_logits(lm)
    if getattr(lm, _FUSED_ATTR, None) is not None:
        unfuse_lm_head(lm)
    # An instance-level wrapper already there (e.g. accelerate's autocast) is kept underneath.
    own = lm.__dict__.get("forward")
    setattr(lm, _FUSED_ATTR, {"forward": own, "backend": backend, "chunk_size": chunk_size, "head_dtype": head_dtype})
    lm.forward = types.MethodType(functools.wraps(type(lm).forward)(_fused_forward()), lm)
    return model


def unfuse_lm_head(model: nn.Module) -> nn.Module:
    """Undo `fuse_lm_head`: the model's forward computes logits (and HF's own loss) again; returns `model`."""
    lm = causal_lm(model)
    state = getattr(lm, _FUSED_ATTR, None)
    if state is None:
        raise ValueError(f"{type(lm).__name__} has no fused head: call fuse_lm_head(model) first")
    if state["forward"] is None:
        del lm.forward
    else:
        lm.forward = state["forward"]
    delattr(lm, _FUSED_ATTR)
    return model


def is_fused(model: nn.Module) -> bool:
    """Whether `fuse_lm_head` is in effect on the model."""
    return getattr(causal_lm(model), _FUSED_ATTR, None) is not None


@torch.no_grad()
def check_head_matches_logits(model: nn.Module, name: str = "model") -> None:
    """Run 4 tokens through the model; refuse it if its logits are not what the fused losses compute."""
    lm = causal_lm(model)
    weight, _ = head_params(lm)
    if weight.device.type == "meta":
        raise UnsupportedModelError(f"{name} has its weights on the meta device: load them before checking the head")
    was_training = lm.training
    lm.eval()
    ids = torch.arange(1, 5, device=weight.device).clamp_max(weight.shape[0] - 1)[None]
    mask = torch.ones_like(ids)
    try:
        want = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits  # no labels: the original forward
        got = hidden_and_head(lm, ids, mask, fn=_float_logits)
    finally:
        lm.train(was_training)
    want = want.float()
    tol = (1e-3 if weight.dtype in (torch.float32, torch.float64) else 5e-2) * (1 + float(want.abs().max()))
    err = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    if not err <= tol:
        raise UnsupportedModelError(
            f"{name}: the model's logits differ from hidden @ lm_head.weight.T (max error {err:.3g}): it "
            "post-processes its logits in a way the fused losses do not reproduce; this model is not supported"
        )


__all__ = [
    "UnsupportedModelError", "check_head_matches_logits", "check_supported", "fuse_lm_head", "head_params",
    "hidden_and_head", "is_fused", "logit_scale", "output_head", "shift_labels", "unfuse_lm_head", "vocab_size",
]
