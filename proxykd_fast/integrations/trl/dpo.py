"""`ProxyDPOTrainer`: TRL's DPOTrainer on our token-chunked `dpo_loss` (no per-pair [2, T, V] logits).

Everything else is DPOTrainer's: datasets, collator, reference handling (a `ref_model`; PEFT with
the adapter disabled or TRL's `ref` copy of it; or `precompute_ref_log_probs=True` with the
`ref_chosen_logps` / `ref_rejected_logps` columns as summed log-probs, columns already in the
dataset used as given), and the logged metrics under the same names and scales. `loss_type` is
one of sigmoid, ipo, hinge, robust, apo_zero, optionally with "sft" (TRL's NLL on the chosen
answers, weighted by `loss_weights`): Proxy-KD's proxy alignment is `loss_type=["sigmoid", "sft"]`.

Per-pair weights (pair_weights.py): `sample_weight_column` names a dataset column with one float
weight >= 0 per pair, and `use_weighting=True` is TRL's WPO (weights from the policy's own token
probabilities, as DPOTrainer computes them); with both, a pair's weight is their product. The
preference term becomes sum_b w_b l_b / B (not renormalised: mean-1 weights keep the loss scale),
the `sft` term stays unweighted, rewards/* and logps/* stay plain means over pairs (as TRL logs them
under WPO), and `weight_mean` logs the batch's mean pair weight.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from trl import DPOConfig, DPOTrainer

from proxykd_fast.integrations.hf import IGNORE_INDEX, hidden_and_head, shift_labels
from proxykd_fast.losses import dpo_loss, sequence_log_probs

from .metrics import token_metrics_due, token_stats
from .options import backend_field, check_fused_options, chunk_size_field, token_metrics_field
from .pair_weights import PairWeightCollator, check_weight_column, wpo_weights

PREFERENCE_TYPES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero")
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


@dataclass
class ProxyDPOConfig(DPOConfig):
    """DPOConfig plus the fused loss's chunking and backend, and a dataset column of per-pair weights."""

    chunk_size: int | None = chunk_size_field("Tokens")
    backend: str = backend_field()
    token_metrics: str = token_metrics_field()
    sample_weight_column: str | None = field(default=None, metadata={
        "help": "Dataset column with one float weight >= 0 per pair: loss = sum_b w_b l_b / B (None: unweighted)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fused_options(self)
        c = self.sample_weight_column
        if c is not None and (not isinstance(c, str) or not c):
            raise TypeError(f"sample_weight_column must be a column name (a non-empty str) or None, got {c!r}")
        if c in _NON_MODEL_KEYS or c in ("input_ids", "attention_mask", "prompt_ids", "chosen_ids", "rejected_ids"):
            raise ValueError(f"sample_weight_column={c!r} is a column DPOTrainer already uses; name the weights "
                             "otherwise (e.g. 'sample_weight')")


def _loss_plan(args: DPOConfig) -> tuple[str, float, float]:
    """(preference loss type, its weight, NLL weight relative to it) from TRL's loss_type / loss_weights."""
    types = list(args.loss_type)
    weights = list(args.loss_weights or [1.0] * len(types))
    pref = [t for t in types if t != "sft"]
    if len(pref) != 1 or pref[0] not in PREFERENCE_TYPES or len(types) - len(pref) > 1:
        raise ValueError(f"loss_type must be one of {PREFERENCE_TYPES}, optionally with 'sft', got {types}")
    w_pref = float(weights[types.index(pref[0])])
    w_sft = float(weights[types.index("sft")]) if "sft" in types else 0.0
    if not w_pref > 0 or w_sft < 0:
        raise ValueError(f"loss_weights must give the preference loss a weight > 0 and 'sft' one >= 0, got {weights}")
    return pref[0], w_pref, w_sft / w_pref


class ProxyDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss and metrics come from the fused, token-chunked `dpo_loss`."""

    _tag_names = ["trl", "dpo", "proxy-kd"]

    def __init__(self, model: Any, ref_model: nn.Module | None = None, args: DPOConfig | None = None,
                 **kwargs: Any) -> None:
        args = args if args is not None else ProxyDPOConfig("proxy-dpo")
        if not isinstance(args, DPOConfig):
            raise TypeError(f"args must be a DPOConfig, got {type(args).__name__}")
        self._plan = _loss_plan(args)
        unsupported = {"ld_alpha": args.ld_alpha is not None, "padding_free": args.padding_free,
                       "f_divergence_type": args.f_divergence_type != "reverse_kl"}
        bad = [k for k, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"ProxyDPOTrainer does not support {bad} (the fused loss has no such option)")
        self._chunk_size = getattr(args, "chunk_size", None)
        self._backend = getattr(args, "backend", "auto")
        self._weight_column = getattr(args, "sample_weight_column", None)
        self._non_model_keys = _NON_MODEL_KEYS | ({self._weight_column} if self._weight_column else set())
        if self._weight_column:  # before tokenization and any reference precompute
            check_weight_column(kwargs.get("train_dataset"), self._weight_column, "train")
            check_weight_column(kwargs.get("eval_dataset"), self._weight_column, "eval")
        elif "sample_weight" in (getattr(kwargs.get("train_dataset"), "column_names", None) or []):
            warnings.warn("the train dataset has a sample_weight column, but sample_weight_column is None: pairs are "
                          "unweighted (set sample_weight_column='sample_weight' to weight them)", stacklevel=2)
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("the MoE router aux loss is not supported by ProxyDPOTrainer: set router_aux_loss_coef=0")
        if self._weight_column:
            self.data_collator = PairWeightCollator(self.data_collator, self._weight_column)

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the weight column through `remove_unused_columns`."""
        super()._set_signature_columns_if_needed()
        if self._weight_column and self._weight_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self._weight_column]

    # ---------------------------------------------------------------- reference log-probs

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        """Columns already in the dataset are the reference (TRL's convention: summed log-probs)."""
        if {"ref_chosen_logps", "ref_rejected_logps"} <= set(getattr(dataset, "column_names", None) or []):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _reference_context(self) -> Any:
        """Disable gradient checkpointing, and under PEFT without a ref_model, the adapter."""
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs))
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            stack.enter_context(use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None))
        return stack

    @staticmethod
    def _targets(inputs: dict[str, Any]) -> Tensor:
        """Shifted labels: completion tokens of each row, prompt and padding ignored."""
        return shift_labels(inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX))

    def _model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in inputs.items() if k not in self._non_model_keys}

    def compute_ref_log_probs(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Summed reference log-probs of the chosen and the rejected completions (TRL's precompute hook)."""
        targets = self._targets(inputs)
        with self._reference_context(), self.accelerator.autocast():
            hidden, weight, bias = hidden_and_head(model, **self._model_inputs(inputs))
            logps = sequence_log_probs(hidden, weight, targets, bias=bias, chunk_size=self._chunk_size,
                                       backend=self._backend)
        return logps.chunk(2, dim=0)

    # ---------------------------------------------------------------- loss

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool) -> Any:
        mode = "train" if self.model.training else "eval"
        loss_type, w_pref, nll_alpha = self._plan
        targets = self._targets(inputs)
        model_inputs = self._model_inputs(inputs)
        ref: dict[str, Any] = {}
        if self.precompute_ref_logps:
            ref["ref_logps"] = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
        else:
            with self._reference_context():
                rh, rw, rb = hidden_and_head(self.ref_model or model, **model_inputs)
            ref.update(ref_hidden=rh, ref_weight=rw, ref_bias=rb)
        smoothing = self.label_smoothing if loss_type == "robust" else 0.0  # TRL smooths only robust (and EXO)
        wpo = bool(self.args.use_weighting)
        due = token_metrics_due(self) or wpo  # WPO's weights come from the same pass: log what it gives
        column = inputs[self._weight_column] if self._weight_column else None

        def head_fn(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Any, ...]:
            t = targets.to(hidden.device)
            if "ref_hidden" in ref and ref["ref_hidden"].dtype != hidden.dtype:  # both sides as the head sees them
                ref["ref_hidden"] = ref["ref_hidden"].to(hidden.dtype)
                ref["ref_weight"] = ref["ref_weight"].to(hidden.dtype)
            stats, mask = token_stats(hidden, weight, bias, t, wpo=wpo) if due else (None, None)
            w = None if column is None else column.to(hidden.device, torch.float32)
            if wpo:
                w_wpo = wpo_weights(stats.wpo_logp, mask)
                w = w_wpo if w is None else w * w_wpo
            loss, metrics = dpo_loss(hidden, weight, t, beta=self.beta, loss_type=loss_type, nll_alpha=nll_alpha,
                                     label_smoothing=smoothing, bias=bias, chunk_size=self._chunk_size,
                                     backend=self._backend, sample_weight=w, **ref)
            return loss, metrics, (stats, mask), w

        loss, metrics, (stats, mask), pair_w = hidden_and_head(model, fn=head_fn, **model_inputs)
        loss = loss * w_pref
        if pair_w is not None:
            w_mean = self.accelerator.gather_for_metrics(pair_w.double().mean().to(self.accelerator.device)[None])
            self._metrics[mode]["weight_mean"].append(float(w_mean.mean()))
        self._log_dpo_metrics(mode, inputs, metrics, stats, mask)
        if return_outputs:
            return loss, None
        return loss

    def _log_dpo_metrics(self, mode: str, inputs: dict[str, Any], metrics: dict[str, Tensor], stats: Any,
                         mask: Tensor) -> None:
        """DPOTrainer's metrics, reduced over processes the way it reduces them."""
        gather = self.accelerator.gather_for_metrics
        device = self.accelerator.device
        m = self._metrics[mode]
        if mode == "train":
            self._total_train_tokens += int(gather(inputs["attention_mask"].sum()).sum()) // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected")
        values = gather(torch.stack([metrics[k].double() for k in names]).to(device)[None]).mean(0).tolist()
        for k, v in zip(names, values):
            m[k].append(v)
        if stats is None:  # token statistics only on the logged steps (token_metrics)
            return
        pairs = mask.shape[0] // 2
        row = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
        chosen = (row < pairs).to(stats.mean_logit.device)
        local = torch.stack([
            stats.entropy.double().sum(), torch.tensor(float(stats.entropy.numel()), dtype=torch.float64,
                                                       device=stats.entropy.device),
            stats.mean_logit[chosen].double().sum(), chosen.double().sum(),
            stats.mean_logit[~chosen].double().sum(), (~chosen).double().sum(),
            (stats.is_top1 & chosen).double().sum(),
        ]).to(device)
        ent, n_tok, lc, nc, lr, nr, correct = gather(local[None]).sum(0).tolist()
        m["entropy"].append(ent / n_tok if n_tok else 0.0)
        m["logits/chosen"].append(lc / nc if nc else 0.0)
        m["logits/rejected"].append(lr / nr if nr else 0.0)
        m["mean_token_accuracy"].append(correct / nc if nc else 0.0)
