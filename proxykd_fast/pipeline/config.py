"""Stage configs: dataclasses that load from YAML and are overridden by CLI flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .options import check_choice, check_range, check_split_spec, coerce

C = TypeVar("C", bound="StageConfig")
DTYPES = ("float32", "bfloat16", "float16", "float64")
REPORTERS = ("none", "tensorboard", "wandb")
# transformers' SchedulerType values (importing it pulls in peft: seconds, so the names are listed here).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay")
STUDENT_SPLIT_HELP = ("slice of --data used, 'start:stop' as fractions (or counts when > 1); 0.55:1 is the "
                      "paper's student share: align-proxy uses 0:0.1 (warm-up) and 0.1:0.55 (alignment)")
DATA_HELP = "teacher records: a collect output dir, a JSONL, JSON or parquet file, or a datasets save_to_disk dir"
DTYPE_HELP = "dtype the model weights are loaded in: float32, bfloat16, float16 or float64"
BACKEND_HELP = ("kernels of the fused losses: auto (triton on CUDA when available, else torch), reference "
                "(full logits), torch (chunked), triton, triton-chunked, triton-fused or cuda")
CHUNK_HELP = ("rows (tokens) per [rows x vocab] logits chunk of the fused losses, trading memory for speed; "
              "unset: the backend's default (the chunked ones fit a 256 MiB CPU / 2 GiB GPU workspace)")
MAX_LENGTH_HELP = ("most tokens of prompt + answer: answers are cut to fit, an over-long prompt keeps its last "
                   "max_length - 1 tokens")
PROGRESS_HELP = "show tqdm progress bars (main process only)"
LOGLIK_HELP = "log-likelihood the weights w use: sum over the answer tokens, or the per-token mean"
NORMALIZE_HELP = "rescale the weights w to mean 1 over the samples their mu/sigma come from"


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    """The resolved annotation of a dataclass field, with Optional unwrapped."""
    hint = _hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached per class)."""
    cached = cls.__dict__.get("_hints_cache")
    if cached is None:
        cached = typing.get_type_hints(cls)
        cls._hints_cache = cached  # type: ignore[attr-defined]
    return cached


@dataclass
class StageConfig:
    """Base class: YAML loading, flag generation and validation shared by every stage."""

    def __post_init__(self) -> None:
        """Coerce every field to its annotated type (YAML reads `1e-5` as a string), then validate."""
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        """Refuse option values out of range (ValueError naming the option); subclasses extend it."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config from a dict, refusing unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, **overrides: Any) -> C:
        """Load a YAML file (a mapping of field names) and apply keyword overrides."""
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping of options")
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for logging and saving next to outputs)."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add `--config` and one `--flag` per field (default None: only given flags override)."""
        parser.add_argument("--config", help="YAML file with options; flags given here override it")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            typ = _field_type(cls, f)
            helptext = f.metadata.get("help", "") + _default_note(f)
            if typ is bool:
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
            elif typ in (int, float, str):
                parser.add_argument(flag, dest=f.name, type=typ, default=None, help=helptext)
            else:
                parser.add_argument(flag, dest=f.name, type=_json_or_str, default=None, help=helptext + " (JSON)")

    @classmethod
    def from_args(cls: type[C], args: argparse.Namespace) -> C:
        """Config from `--config` YAML (if any) with the given flags applied on top."""
        overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if getattr(args, "config", None):
            return cls.from_yaml(args.config, **overrides)
        return cls.from_dict(overrides)


def _default_note(f: dataclasses.Field) -> str:
    """' (default: X)' for a help text, X as YAML spells it; empty for a field without a set default."""
    value = f.default
    if value is dataclasses.MISSING or value is None or value == "":
        return ""
    shown = json.dumps(value) if isinstance(value, bool) else str(value)
    return f" (default: {shown.replace('%', '%%')})"


def _json_or_str(text: str) -> Any:
    """Parse a JSON value from the command line, else keep the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _check_common(cfg: Any) -> None:
    """Checks shared by every stage: dtype, backend, chunk size, batch size, max length."""
    from proxykd_fast.losses import BACKENDS

    check_choice("dtype", cfg.dtype, DTYPES)
    check_choice("backend", cfg.backend, BACKENDS)
    check_range("chunk_size", cfg.chunk_size, 1)
    check_range("batch_size", cfg.batch_size, 1)
    check_range("max_length", cfg.max_length, 2)


@dataclass
class TrainConfig(StageConfig):
    """Options shared by the training stages (optimizer, schedule, logging, checkpoints)."""

    output_dir: str = field(default="proxykd_out", metadata={
        "help": "directory of the final model (from_pretrained-loadable, LoRA merged), checkpoints, metrics.jsonl "
                "and the saved run config; align-proxy keeps each phase's checkpoints and metrics in sft/ and "
                "round-N/"})
    seed: int = field(default=0, metadata={
        "help": "seed of torch (initialisation, sampling) and of the data order, a pure function of "
                "(seed, epoch) so a resume sees the same batches"})
    learning_rate: float = field(default=1e-4, metadata={
        "help": "AdamW learning rate (align-proxy: of the SFT warm-up, and of the DPO rounds unless "
                "--round-learning-rate)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (0: none)"})
    lr_scheduler: str = field(default="constant", metadata={
        "help": "transformers scheduler name: constant, linear, cosine, cosine_with_restarts, polynomial, "
                "constant_with_warmup, inverse_sqrt, ...; it restarts in each align-proxy phase"})
    warmup_steps: int = field(default=0, metadata={
        "help": "learning-rate warm-up steps of the scheduler (0: none; with the constant scheduler they make it "
                "constant_with_warmup); not align-proxy's SFT warm-up, see --warmup-steps-sft"})
    batch_size: int = field(default=8, metadata={
        "help": "micro-batch size per process; an optimizer step sees batch_size * grad_accum * processes "
                "samples"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches accumulated per optimizer step (exact: the loss is normalised by the global "
                "token / pair count)"})
    max_steps: int = field(default=0, metadata={
        "help": "optimizer steps of the run (align-proxy: of each phase without its own step count), "
                "overriding the epochs; 0: from the epochs"})
    num_epochs: float = field(default=1.0, metadata={
        "help": "passes over the training split when max_steps is 0 (fractions allowed); align-proxy uses "
                "--warmup-epochs and --round-epochs instead"})
    max_length: int = field(default=1024, metadata={"help": MAX_LENGTH_HELP})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "clip the gradient norm to this value; 0: no clipping"})
    dtype: str = field(default="float32", metadata={"help": DTYPE_HELP})
    lora: dict | None = field(default=None, metadata={
        "help": "peft LoraConfig keyword arguments, e.g. '{\"r\": 16, \"lora_alpha\": 32}'; target_modules "
                "defaults to all-linear and task_type to CAUSAL_LM; adapters on lm_head are refused (the fused "
                "losses read the head weight); merged into the saved model; unset: full fine-tuning"})
    eval_data: str | None = field(default=None, metadata={
        "help": "held-out teacher records (formats as --data) scored by per-token NLL; align-proxy also scores "
                "them before and after each phase, to revert a round that made them worse"})
    eval_every: int = field(default=0, metadata={
        "help": "held-out evaluation every N optimizer steps and at the last one (needs --eval-data); 0: none "
                "during training"})
    eval_batch_size: int = field(default=32, metadata={
        "help": "batch size of the no-grad passes: held-out NLL, align-proxy's reference log-probs, distill's "
                "online dataset weights"})
    early_stopping_patience: int = field(default=0, metadata={
        "help": "stop after N evaluations in a row without a new best held-out NLL; the best weights are "
                "restored at the end; 0: off"})
    save_every: int = field(default=0, metadata={
        "help": "checkpoint every N optimizer steps into the run's checkpoints/ dir (only the latest is kept; "
                "--resume continues from it); 0: no checkpoints"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the latest checkpoint (the stored run config must match); without it the "
                "stage's checkpoints, phase markers and metrics in output_dir are cleared first"})
    max_steps_this_run: int = field(default=0, metadata={
        "help": "stop after N optimizer steps in this invocation (exit code 3, unfinished; continue with "
                "--resume from the last --save-every checkpoint); 0: no limit"})
    log_every: int = field(default=1, metadata={
        "help": "write a metrics row every N optimizer steps (evaluation steps always)"})
    report_to: str = field(default="none", metadata={
        "help": "comma list of none, tensorboard, wandb; metrics.jsonl is always written"})
    progress: bool = field(default=True, metadata={"help": PROGRESS_HELP})
    chunk_size: int | None = field(default=None, metadata={"help": CHUNK_HELP})
    backend: str = field(default="auto", metadata={"help": BACKEND_HELP})

    def validate(self) -> None:
        """Ranges and choices of the training options."""
        _check_common(self)
        check_range("learning_rate", self.learning_rate, 0)
        check_range("weight_decay", self.weight_decay, 0)
        check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        for name in ("warmup_steps", "max_steps", "eval_every", "early_stopping_patience", "save_every",
                     "max_steps_this_run"):
            check_range(name, getattr(self, name), 0)
        check_range("grad_accum", self.grad_accum, 1)
        check_range("eval_batch_size", self.eval_batch_size, 1)
        check_range("log_every", self.log_every, 1)
        check_range("num_epochs", self.num_epochs, 0, low_open=True)
        check_range("max_grad_norm", self.max_grad_norm, 0)
        for name in (r.strip() for r in self.report_to.split(",")):
            check_choice("report_to", name, REPORTERS)


@dataclass
class AlignProxyConfig(TrainConfig):
    """Proxy alignment: SFT warm-up on teacher data, then K rounds of NLL + DPO(teacher vs proxy sample)."""

    proxy: str = field(default="", metadata={
        "help": "white-box proxy model to align, a Hugging Face id or local dir; its tokenizer reads --data "
                "(required)"})
    data: str = field(default="", metadata={"help": DATA_HELP + " (required)"})
    warmup_split: str = field(default="0:0.1", metadata={"help": "slice of --data for the SFT warm-up (paper: 10%%)"})
    align_split: str = field(default="0.1:0.55", metadata={"help": "slice of --data for the DPO rounds (paper: 45%%)"})
    warmup_steps_sft: int = field(default=0, metadata={
        "help": "optimizer steps of the SFT warm-up; 0: max_steps if set, else --warmup-epochs"})
    warmup_epochs: float = field(default=1.0, metadata={
        "help": "passes over warmup_split in the SFT warm-up (fractions allowed)"})
    rounds: int = field(default=2, metadata={
        "help": "K rounds of NLL + DPO after the warm-up; each samples fresh rejected answers from the current "
                "proxy, which is also the round's frozen reference; 0: SFT warm-up only"})
    round_epochs: float = field(default=1.0, metadata={
        "help": "passes over align_split per DPO round (fractions allowed)"})
    round_steps: int = field(default=0, metadata={
        "help": "optimizer steps per DPO round; 0: max_steps if set, else --round-epochs"})
    round_learning_rate: float | None = field(default=None, metadata={
        "help": "learning rate of the DPO rounds; unset or 0: --learning-rate"})
    beta: float = field(default=0.1, metadata={
        "help": "DPO beta (> 0): scale of the policy-minus-reference log-ratio margin"})
    nll_alpha: float = field(default=1.0, metadata={
        "help": "weight of the per-token NLL of the teacher (chosen) answers added to the mean DPO loss; "
                "0: DPO only"})
    dpo_loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid, ipo, hinge, robust or apo_zero"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "DPO label smoothing in [0, 0.5) (conservative DPO; loss types sigmoid and robust only)"})
    average_log_prob: bool = field(default=False, metadata={
        "help": "DPO compares per-token mean log-probs instead of sums (ipo always uses means)"})
    gen_max_new_tokens: int = field(default=256, metadata={
        "help": "most new tokens of each sampled rejected answer"})
    gen_temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature (> 0) of the rejected answers"})
    gen_top_p: float = field(default=1.0, metadata={
        "help": "nucleus top-p in (0, 1] of the rejected-answer sampling (1: off)"})
    gen_top_k: int = field(default=0, metadata={"help": "top-k of the rejected-answer sampling (0: off)"})
    gen_batch_size: int = field(default=32, metadata={
        "help": "prompts per generate call when sampling rejected answers"})
    keep_round_if_worse: bool = field(default=False, metadata={
        "help": "keep a DPO round that raised the held-out NLL; without it such a round is reverted and the "
                "rounds stop (needs --eval-data)"})

    def validate(self) -> None:
        """Ranges and choices of the alignment options."""
        from proxykd_fast.losses.dpo import LOSS_TYPES, SMOOTHED_LOSS_TYPES

        super().validate()
        check_split_spec("warmup_split", self.warmup_split)
        check_split_spec("align_split", self.align_split)
        for name in ("warmup_steps_sft", "rounds", "round_steps", "gen_top_k"):
            check_range(name, getattr(self, name), 0)
        check_range("warmup_epochs", self.warmup_epochs, 0, low_open=True)
        check_range("round_epochs", self.round_epochs, 0, low_open=True)
        check_range("round_learning_rate", self.round_learning_rate, 0)
        check_range("beta", self.beta, 0, low_open=True)
        check_range("nll_alpha", self.nll_alpha, 0)
        check_choice("dpo_loss_type", self.dpo_loss_type, LOSS_TYPES)
        check_range("label_smoothing", self.label_smoothing, 0, 0.5, high_open=True)
        if self.label_smoothing and self.dpo_loss_type not in SMOOTHED_LOSS_TYPES:
            raise ValueError(f"option 'label_smoothing' needs dpo_loss_type in {', '.join(SMOOTHED_LOSS_TYPES)}; "
                             f"got dpo_loss_type={self.dpo_loss_type!r}")
        check_range("gen_max_new_tokens", self.gen_max_new_tokens, 1)
        check_range("gen_temperature", self.gen_temperature, 0, low_open=True)
        check_range("gen_top_p", self.gen_top_p, 0, 1, low_open=True)
        check_range("gen_batch_size", self.gen_batch_size, 1)


@dataclass
class PrecomputeConfig(StageConfig):
    """Offline proxy targets: per-token top-k log-probs and per-sample log-likelihoods and weights."""

    proxy: str = field(default="", metadata={
        "help": "aligned proxy model, e.g. align-proxy's output_dir, or a Hugging Face id (required)"})
    data: str = field(default="", metadata={"help": DATA_HELP + " (required)"})
    output_dir: str = field(default="proxykd_targets", metadata={
        "help": "directory of the target shards, weights.parquet and manifest.json (distill --targets)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer of the records (the student's); must have the proxy's exact vocabulary; unset: "
                "the proxy's"})
    top_k: int = field(default=10, metadata={
        "help": "log-probs stored per answer token (the proxy's k most likely ids); distill renormalises over "
                "them"})
    batch_size: int = field(default=16, metadata={"help": "examples per proxy forward pass"})
    shard_size: int = field(default=1024, metadata={
        "help": "examples per shard file (a shard is the unit --resume keeps)"})
    max_length: int = field(default=1024, metadata={"help": MAX_LENGTH_HELP})
    format: str = field(default="parquet", metadata={"help": "shard file format: parquet or safetensors"})
    loglik: str = field(default="sum", metadata={
        "help": LOGLIK_HELP + "; distill recomputes the weights when its --loglik differs"})
    normalize_weights: bool = field(default=False, metadata={
        "help": NORMALIZE_HELP + "; distill recomputes the weights when its setting differs"})
    dtype: str = field(default="float32", metadata={"help": DTYPE_HELP})
    progress: bool = field(default=True, metadata={"help": PROGRESS_HELP})
    chunk_size: int | None = field(default=None, metadata={"help": CHUNK_HELP})
    backend: str = field(default="auto", metadata={"help": BACKEND_HELP})
    split: str = field(default="0.55:1", metadata={"help": STUDENT_SPLIT_HELP})
    resume: bool = field(default=False, metadata={
        "help": "keep the shards already written (the stored run info must match); without it existing "
                "shards in output_dir are deleted first"})
    # Bayesian targets (the paper's first version; proxykd_fast.prior): see `proxykd prior`.
    prior: str | None = field(default=None, metadata={
        "help": "a `proxykd prior` output dir: store the posterior's top-k (corpus counts updated with the "
                "proxy, leave-one-out) instead of the proxy's; the weights stay the proxy's"})
    posterior: str = field(default="dirichlet", metadata={
        "help": "with --prior: dirichlet (q = (c + kappa * base) / (n + kappa), base = alpha * proxy + (1 - "
                "alpha) * shorter-context prior), product (log q = lambda log prior + (1 - lambda) log proxy, "
                "normalised over the vocabulary) or prior (the corpus prior alone)"})
    prior_strength: float | None = field(default=None, metadata={
        "help": "kappa (dirichlet, > 0) or lambda (product, in [0, 1]); unset: fitted to the held-out "
                "likelihood of teacher tokens (leave-one-out), written to posterior_fit.json"})
    prior_mix: float | None = field(default=None, metadata={
        "help": "alpha in [0, 1], the proxy's share of the dirichlet base measure (1: the proxy alone); "
                "unset: fitted with kappa"})
    posterior_fit_data: str | None = field(default=None, metadata={
        "help": "teacher records the strength is fitted on (ideally ones the proxy was not trained on); "
                "unset: the first --posterior-fit-samples samples of the split, each without its own counts"})
    posterior_fit_samples: int = field(default=1000, metadata={
        "help": "most samples the strength is fitted on"})

    def validate(self) -> None:
        """Ranges and choices of the precompute options."""
        _check_common(self)
        from proxykd_fast.prior.hook import check_posterior_options

        check_posterior_options(self.prior, self.posterior, self.prior_strength, self.prior_mix,
                                self.posterior_fit_data)
        check_range("posterior_fit_samples", self.posterior_fit_samples, 1)
        check_range("top_k", self.top_k, 1)
        check_range("shard_size", self.shard_size, 1)
        check_choice("format", self.format, ("parquet", "safetensors"))
        check_choice("loglik", self.loglik, ("sum", "mean"))
        check_split_spec("split", self.split)


@dataclass
class DistillConfig(TrainConfig):
    """Student distillation: NLL + alpha * w * KL(proxy || student) on offline targets or an online proxy."""

    student: str = field(default="", metadata={
        "help": "student model to train, a Hugging Face id or local dir; its tokenizer reads the data "
                "(required)"})
    targets: str | None = field(default=None, metadata={
        "help": "precompute output dir: offline top-k targets and weights (ignored when --proxy is given)"})
    proxy: str | None = field(default=None, metadata={
        "help": "online proxy model, run without grad on every batch: its full distribution (needed by "
                "reverse_kl and jsd); takes precedence over --targets"})
    data: str | None = field(default=None, metadata={
        "help": DATA_HELP + "; read with an online --proxy or --alpha 0 (offline targets carry their tokens)"})
    split: str = field(default="0.55:1", metadata={"help": STUDENT_SPLIT_HELP + " (online proxy / --alpha 0 only: "
                                                           "offline targets were split by precompute)"})
    alpha: float = field(default=10.0, metadata={
        "help": "weight of the KD term in the per-token mean of NLL + alpha * w * T^2 * KL(proxy || student); 10 "
                "was best in the demo's alpha sweep (README); the paper's 100 goes with its own normalisation; "
                "0: plain SFT on the teacher answers, needing only --data"})
    temperature: float = field(default=1.0, metadata={
        "help": "T (> 0): the KD term compares both distributions softened by T and is scaled by T^2; the NLL "
                "uses T = 1"})
    divergence: str = field(default="forward_kl", metadata={
        "help": "forward_kl = KL(proxy || student) (the paper); reverse_kl and jsd need an online --proxy"})
    jsd_beta: float = field(default=0.5, metadata={
        "help": "b in (0, 1) of divergence=jsd: b * KL(p || m) + (1 - b) * KL(q || m) with m = b * p + (1 - b) "
                "* q (p proxy, q student)"})
    use_weights: bool = field(default=True, metadata={
        "help": "per-sample weights w = sigmoid((loglik - mu) / sigma) from the proxy's log-likelihood of each "
                "teacher answer; --no-use-weights (or --no-weights): w = 1"})
    weight_stats: str = field(default="dataset", metadata={
        "help": "mu/sigma of the weights over the whole training set (dataset) or each micro-batch (batch)"})
    loglik: str = field(default="sum", metadata={"help": LOGLIK_HELP})
    normalize_weights: bool = field(default=False, metadata={"help": NORMALIZE_HELP})

    def validate(self) -> None:
        """Ranges and choices of the distillation options."""
        from proxykd_fast.losses._validation import DIVERGENCES

        super().validate()
        check_split_spec("split", self.split)
        check_range("alpha", self.alpha, 0)
        check_range("temperature", self.temperature, 0, low_open=True)
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_range("jsd_beta", self.jsd_beta, 0, 1, low_open=True, high_open=True)
        check_choice("weight_stats", self.weight_stats, ("dataset", "batch"))
        check_choice("loglik", self.loglik, ("sum", "mean"))


@dataclass
class EvalConfig(StageConfig):
    """Evaluation: held-out NLL of teacher answers, KL to a reference model, generation samples."""

    model: str = field(default="", metadata={
        "help": "model to evaluate, a Hugging Face id or local dir (required)"})
    data: str = field(default="", metadata={"help": DATA_HELP + " (required)"})
    output: str | None = field(default=None, metadata={
        "help": "also write the result JSON to this file (it is always printed)"})
    reference: str | None = field(default=None, metadata={
        "help": "reference model with the same vocabulary: report per-token KL(reference || model) and NLL; "
                "unset: NLL only"})
    batch_size: int = field(default=32, metadata={"help": "examples per forward pass"})
    max_length: int = field(default=1024, metadata={"help": MAX_LENGTH_HELP})
    num_samples: int = field(default=4, metadata={
        "help": "greedy generations shown next to the teacher's answers, for the first N examples (0: none)"})
    max_new_tokens: int = field(default=64, metadata={"help": "most new tokens of each generation sample"})
    split: str = field(default="0:1", metadata={
        "help": "slice of --data evaluated, 'start:stop' as fractions (or counts when > 1); 0:1: all of it"})
    dtype: str = field(default="float32", metadata={"help": DTYPE_HELP})
    progress: bool = field(default=True, metadata={"help": PROGRESS_HELP})
    chunk_size: int | None = field(default=None, metadata={"help": CHUNK_HELP})
    backend: str = field(default="auto", metadata={"help": BACKEND_HELP})

    def validate(self) -> None:
        """Ranges and choices of the evaluation options."""
        _check_common(self)
        check_range("num_samples", self.num_samples, 0)
        check_range("max_new_tokens", self.max_new_tokens, 1)
        check_split_spec("split", self.split)


def parse_split(spec: str, n: int) -> tuple[int, int]:
    """Turn 'a:b' fractions (or absolute counts when > 1) into [start, stop) indices for n items."""
    lo_s, hi_s = (spec.split(":") + ["1"])[:2]

    def conv(x: str, default: float) -> int:
        v = float(x) if x.strip() else default
        return int(v) if v > 1 else int(round(v * n))

    lo, hi = conv(lo_s, 0.0), conv(hi_s, 1.0)
    lo, hi = max(0, min(lo, n)), max(0, min(hi, n))
    if hi <= lo:
        raise ValueError(f"split {spec!r} selects no items out of {n}")
    return lo, hi


__all__ = [
    "AlignProxyConfig",
    "DistillConfig",
    "EvalConfig",
    "PrecomputeConfig",
    "StageConfig",
    "TrainConfig",
    "field",
    "parse_split",
]
