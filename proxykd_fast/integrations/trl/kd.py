"""`ProxyKDTrainer`: TRL's SFTTrainer with Proxy-KD's loss, L = nll_weight * NLL + alpha * mean_i w_i * T^2 * D_i.

The proxy is online (`proxy_model`: no grad, its full distribution, any divergence) or offline: the
`topk_ids` / `topk_logprobs` columns that `proxykd precompute` writes (see `load_precomputed`). Sample
weights w are the dataset column `sample_weight` (dataset statistics) or, with `weight_stats="batch"`,
sigmoid-standardised proxy log-likelihoods of the micro-batch, as in the pipeline. The loss is one
per-token mean over `num_items_in_batch` (exact under gradient accumulation and across processes); it
is computed inside the student's head call (`hidden_and_head(fn=...)`) so no logits are ever built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from trl import SFTConfig, SFTTrainer

from proxykd_fast.integrations.hf import IGNORE_INDEX, hidden_and_head, shift_labels, vocab_size
from proxykd_fast.losses import linear_cross_entropy, proxy_kd_loss, sequence_log_probs

from .data import TARGET_COLUMNS, ProxyTargetsCollator
from .metrics import token_metrics_due, token_stats
from .options import backend_field, check_fused_options, chunk_size_field, token_metrics_field

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
MODEL_INPUT_SKIP = ("labels", *TARGET_COLUMNS)


@dataclass
class ProxyKDConfig(SFTConfig):
    """SFTConfig plus Proxy-KD's loss options (the names of `proxykd distill` and `proxy_kd_loss`)."""

    alpha: float = field(default=10.0, metadata={"help": (
        "Weight of the KD term (0: plain NLL): L = nll_weight * NLL + alpha * mean w * T^2 * D per token; 10, as 'distill', "
        "from the sweep on the demo world (README); the paper's 100 goes with its own normalization.")})
    nll_weight: float = field(default=1.0, metadata={"help": "Weight of the NLL term on the data (0: pure KD)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of both sides; the KD term has T^2."})
    divergence: str = field(default="forward_kl", metadata={
        "help": "forward_kl = KL(proxy || student), reverse_kl, or jsd (mixture jsd_beta; TRL's beta)."})
    jsd_beta: float = field(default=0.5, metadata={"help": "JSD mixture weight of the proxy, in (0, 1)."})
    use_weights: bool = field(default=True, metadata={"help": "Weight samples by the proxy's likelihood of them."})
    weight_stats: str = field(default="dataset", metadata={
        "help": "dataset: the `sample_weight` column (computed once for an online proxy); batch: micro-batch stats."})
    loglik: str = field(default="sum", metadata={"help": "Weights from summed or mean (per-token) log-likelihood."})
    normalize_weights: bool = field(default=False, metadata={"help": "Scale the weights to mean 1."})
    proxy_model_name_or_path: str | None = field(default=None, metadata={"help": "Online proxy to load."})
    proxy_model_init_kwargs: dict[str, Any] | None = field(default=None, metadata={
        "help": "kwargs for AutoModelForCausalLM.from_pretrained of the proxy."})
    chunk_size: int | None = chunk_size_field("Rows")
    backend: str = backend_field()
    token_metrics: str = token_metrics_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha", "nll_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.alpha == 0 and self.nll_weight == 0:
            raise ValueError("alpha and nll_weight are both 0: the loss would be zero")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.weight_stats not in ("dataset", "batch"):
            raise ValueError(f"weight_stats must be 'dataset' or 'batch', got {self.weight_stats!r}")
        if self.loglik not in ("sum", "mean"):
            raise ValueError(f"loglik must be 'sum' or 'mean', got {self.loglik!r}")
        check_fused_options(self)


def kd_objective(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None, nll_weight: float,
                 alpha: float, num_items_in_batch: Any, **kd: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """(nll_weight * sum NLL + alpha * sum w T^2 D) / num_items_in_batch (or the scored count), and detached sums."""
    if alpha == 0:
        nll = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="sum",
                                   chunk_size=kd.get("chunk_size"), backend=kd.get("backend", "auto"))
        count = (labels != IGNORE_INDEX).sum()
        denom = num_items_in_batch if num_items_in_batch is not None else count.clamp_min(1)
        if isinstance(denom, Tensor):
            denom = denom.to(nll.device)
        return nll_weight * nll / denom, {"nll": nll.detach().double(), "kd": torch.zeros((), dtype=torch.float64),
                                          "valid_tokens": count}
    return proxy_kd_loss(hidden, weight, labels, student_bias=bias, nll_weight=nll_weight, alpha=alpha,
                         num_items_in_batch=num_items_in_batch, return_components=True, **kd)


class ProxyKDTrainer(SFTTrainer):
    """SFTTrainer that distils a white-box proxy into the student with Proxy-KD's weighted, fused loss.

    `proxy_model` (a model or a path; or `args.proxy_model_name_or_path`) gives online targets;
    without it the train dataset must carry `topk_ids` / `topk_logprobs` (`load_precomputed`), or
    `alpha` must be 0 (plain SFT on our fused CE). Logs TRL's `loss`, `entropy`, `mean_token_accuracy`,
    `num_tokens`, plus `nll`, `kd` (per-token means, kd unweighted) and `weight_mean`.
    """

    _tag_names = ["trl", "sft", "proxy-kd"]

    def __init__(self, model: Any, proxy_model: nn.Module | str | None = None, args: ProxyKDConfig | None = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, **kwargs: Any) -> None:
        if args is None:
            args = ProxyKDConfig("proxy-kd")
        elif not isinstance(args, ProxyKDConfig):
            raise TypeError(f"args must be a ProxyKDConfig, got {type(args).__name__}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func is not supported: ProxyKDTrainer computes its own loss")
        if args.loss_type != "nll":
            raise ValueError(f"loss_type={args.loss_type!r} is not supported by ProxyKDTrainer; use 'nll'")
        if args.label_smoothing_factor:
            raise ValueError("label_smoothing_factor is not supported: it needs the full logits")
        columns = set(getattr(train_dataset, "column_names", None) or [])
        self._offline = {"topk_ids", "topk_logprobs"} <= columns
        if proxy_model is None and args.proxy_model_name_or_path:
            proxy_model = args.proxy_model_name_or_path
        if args.alpha > 0 and proxy_model is None and not self._offline:
            raise ValueError("alpha > 0 needs a proxy: pass proxy_model, or a train dataset with topk_ids / "
                             "topk_logprobs columns (load_precomputed), or set alpha=0 for plain SFT")
        if args.alpha > 0 and proxy_model is None and args.divergence != "forward_kl":
            raise ValueError(f"divergence={args.divergence!r} needs the proxy's full distribution: pass proxy_model; "
                             "offline top-k targets support divergence='forward_kl' only")
        if self._offline and (args.packing or args.padding_free):
            raise ValueError("offline top-k targets need padded rows: set packing=False and padding_free=False")
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("the MoE router aux loss is not supported by ProxyKDTrainer: set router_aux_loss_coef=0")
        self.data_collator = ProxyTargetsCollator(self.data_collator, args.truncation_mode)
        self.proxy_model = None
        if args.alpha > 0 and proxy_model is not None:
            self.proxy_model = self._prepare_proxy(proxy_model)
        needs_column = args.alpha > 0 and args.use_weights and args.weight_stats == "dataset"
        if needs_column and "sample_weight" not in self.train_dataset.column_names:
            if self.proxy_model is None:
                raise ValueError("weight_stats='dataset' needs a sample_weight column (load_precomputed writes it) "
                                 "or an online proxy; or use weight_stats='batch' / use_weights=False")
            self.train_dataset = self._add_dataset_weights(self.train_dataset)
        if args.alpha > 0 and args.use_weights and args.weight_stats == "batch" and self.proxy_model is None and not (
                {"loglik", "n_tokens"} <= set(self.train_dataset.column_names)):
            raise ValueError("weight_stats='batch' with offline targets needs loglik and n_tokens columns")

    def _prepare_proxy(self, proxy: nn.Module | str) -> nn.Module:
        """Load (if a path), freeze, check the vocabulary and place the proxy for evaluation."""
        if isinstance(proxy, str):
            from transformers import AutoModelForCausalLM

            proxy = AutoModelForCausalLM.from_pretrained(proxy, **(self.args.proxy_model_init_kwargs or {}))
        if not isinstance(proxy, nn.Module):
            raise TypeError(f"proxy_model must be a model or a path, got {type(proxy).__name__}")
        if vocab_size(proxy) != vocab_size(self.model):
            raise ValueError(f"proxy head has {vocab_size(proxy)} rows but the student's has "
                             f"{vocab_size(self.model)}: Proxy-KD needs one shared vocabulary")
        proxy.eval()
        for p in proxy.parameters():
            p.requires_grad_(False)
        return self.accelerator.prepare_model(proxy, evaluation_mode=True)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *TARGET_COLUMNS]))

    @torch.no_grad()
    def _proxy_logliks(self, inputs: dict[str, Any], targets: Tensor) -> tuple[Tensor, Tensor]:
        """The online proxy's summed log-likelihood of each row's scored tokens, and their count per row."""
        hidden, weight, bias = hidden_and_head(self.proxy_model, **self._model_inputs(inputs))
        ll = sequence_log_probs(hidden, weight, targets, bias=bias, chunk_size=self.args.chunk_size,
                                backend=self.args.backend)
        return ll, (targets != IGNORE_INDEX).sum(-1)

    def _add_dataset_weights(self, dataset: Any) -> Any:
        """sample_weight from the online proxy's log-likelihoods over the whole train set (one no-grad pass).

        Every process scores the whole set (the same weights everywhere, no collective needed).
        """
        from tqdm.auto import tqdm

        from proxykd_fast.pipeline.targets import sigmoid_weights

        size = self.args.per_device_eval_batch_size
        lls, counts = [], []
        device = self.accelerator.device
        for start in tqdm(range(0, len(dataset), size), desc="proxy log-likelihoods",
                          disable=not self.accelerator.is_main_process or self.args.disable_tqdm):
            rows = [dict(dataset[i]) for i in range(start, min(start + size, len(dataset)))]
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.data_collator(rows).items()}
            ll, n = self._proxy_logliks(batch, shift_labels(batch["labels"]))
            lls.append(ll.double().cpu())
            counts.append(n.cpu())
        w = sigmoid_weights(torch.cat(lls), torch.cat(counts), self.args.loglik, self.args.normalize_weights)
        return dataset.add_column("sample_weight", w.tolist())

    @staticmethod
    def _model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in inputs.items() if k not in MODEL_INPUT_SKIP and k != "use_cache"}

    def _sample_weights(self, inputs: dict[str, Any], targets: Tensor) -> Tensor | None:
        """Per-row weights w [B] (None: unweighted)."""
        from proxykd_fast.pipeline.targets import sigmoid_weights

        args = self.args
        if not args.use_weights or args.alpha == 0:
            return None
        if args.weight_stats == "dataset":
            return inputs["sample_weight"].float()
        if self.proxy_model is not None:
            ll, n = self._proxy_logliks(inputs, targets)
        else:
            ll, n = inputs["loglik"], inputs["n_tokens"]
        return sigmoid_weights(ll, n, args.loglik, args.normalize_weights).to(targets.device)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        mode = "train" if self.model.training else "eval"
        args = self.args
        targets = shift_labels(inputs["labels"])
        model_inputs = self._model_inputs(inputs)
        kd: dict[str, Any] = dict(temperature=args.temperature, divergence=args.divergence, jsd_beta=args.jsd_beta,
                                  chunk_size=args.chunk_size, backend=args.backend)
        weights = self._sample_weights(inputs, targets)
        due = token_metrics_due(self)
        if args.alpha > 0 and self.proxy_model is not None:
            with torch.no_grad():
                ph, pw, pb = hidden_and_head(self.proxy_model, **model_inputs)
            kd.update(proxy_hidden=ph, proxy_weight=pw, proxy_bias=pb)
        elif args.alpha > 0:
            kd.update(proxy_topk_ids=inputs["topk_ids"], proxy_topk_logprobs=inputs["topk_logprobs"])
            kd.pop("divergence")

        def head_fn(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, dict[str, Tensor], Any]:
            loss, comp = kd_objective(hidden, weight, targets.to(hidden.device), bias=bias,
                                      nll_weight=args.nll_weight, alpha=args.alpha,
                                      num_items_in_batch=num_items_in_batch, sample_weight=weights, **kd)
            stats = token_stats(hidden, weight, bias, targets.to(hidden.device), chunk_rows=args.chunk_size)[0] \
                if due else None
            return loss, comp, stats

        loss, comp, stats = hidden_and_head(model, fn=head_fn, **model_inputs)
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._log_kd_metrics(mode, inputs, comp, stats, weights)
        return (loss, None) if return_outputs else loss

    def _log_kd_metrics(self, mode: str, inputs: dict[str, Any], comp: dict[str, Tensor], stats: Any,
                        weights: Tensor | None) -> None:
        """TRL-style per-micro-batch metrics, summed over processes before the ratio."""
        gather = self.accelerator.gather_for_metrics
        device = self.accelerator.device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        local = torch.stack([comp["nll"].double().to(device), comp["kd"].double().to(device),
                             zero if stats is None else stats.entropy.double().sum().to(device),
                             zero if stats is None else stats.is_top1.double().sum().to(device),
                             comp["valid_tokens"].double().to(device)])
        nll, kd, ent, correct, valid = gather(local[None]).sum(0).tolist()
        denom = max(valid, 1.0)
        m = self._metrics[mode]
        m["nll"].append(nll / denom)
        m["kd"].append(kd / denom)
        if stats is not None:  # computed on the logged steps only (token_metrics)
            m["entropy"].append(ent / denom if valid else 0.0)
            m["mean_token_accuracy"].append(correct / denom if valid else 0.0)
        w = torch.ones(inputs["labels"].shape[0], device=device) if weights is None else weights.float().to(device)
        m["weight_mean"].append(float(gather(w).mean()))
        if mode == "train":
            self._total_train_tokens += int(gather(inputs["attention_mask"].sum()).sum()) // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Tensor, None, None]:
        """Eval loss only: the fused head builds no logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
