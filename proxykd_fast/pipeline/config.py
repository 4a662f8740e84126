"""Stage configs: dataclasses with TRL / TrainingArguments names, parsed by `proxykd_fast.argparsing`.

`StageConfig` holds what every stage that runs a model shares, `TrainConfig` the training options
of align-proxy and distill (TrainingArguments' names; a new shared training flag is added there
once). Older names stay as aliases (`batch_size` for `per_device_train_batch_size`, `--save-every`
for `--save-steps`, ...): as flags, YAML keys and Python keywords.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from proxykd_fast.options import check_choice, check_range, check_split_spec, coerce_fields, config_dataclass, option

C = TypeVar("C", bound="StageConfig")
DTYPES = ("float32", "bfloat16", "float16", "float64")
REPORTERS = ("none", "tensorboard", "wandb")
# transformers' SchedulerType values (importing it pulls in peft: seconds, so the names are listed here).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay")
DATASET_REJECTED = ("refuse", "first_round", "ignore")
STUDENT_SPLIT_HELP = ("slice of --data used, 'start:stop' as fractions (or counts when > 1); 0.55:1 is the "
                      "paper's student share: align-proxy uses 0:0.1 (warm-up) and 0.1:0.55 (alignment)")
DATA_HELP = ("teacher records in a TRL format (prompt/completion, messages, text, prompt/chosen/rejected, implicit-"
             "prompt chosen/rejected): a collect output dir, a JSONL, JSON or parquet file, a datasets save_to_disk "
             "dir, or a dataset dir or cached name that datasets.load_dataset reads (its train split)")
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
RESUME_HELP = ("true: continue the run recorded in output_dir from its newest intact checkpoint (the run's options "
               "must match; broken checkpoints are reported and skipped), refused when there is nothing to "
               "continue (no run recorded, or no intact checkpoint of the interrupted phase); auto: the same, but "
               "start fresh, saying so, when there is nothing to continue; false: start fresh, clearing the "
               "stage's checkpoints, phase markers and metrics in output_dir first. A checkpoint path is not "
               "accepted: the run picks its checkpoint")


@config_dataclass
class StageConfig:
    """Options of every stage that runs a model; YAML loading, coercion and validation."""

    PATH_OPTIONS: ClassVar[tuple[str, ...]] = ()  # options holding local paths (resolved in a run's identity)

    max_length: int = option(1024, help=MAX_LENGTH_HELP)
    dtype: str = option("float32", help=DTYPE_HELP)
    per_device_eval_batch_size: int = option(32, aliases=("eval_batch_size",), help=(
        "batch size of the no-grad passes: held-out NLL, align-proxy's reference log-probs, distill's online "
        "dataset weights"))
    progress: bool = option(True, help=PROGRESS_HELP)
    chunk_size: int | None = option(None, help=CHUNK_HELP)
    backend: str = option("auto", help=BACKEND_HELP)

    def __post_init__(self) -> None:
        """Coerce every field to its annotated type (YAML reads `1e-5` as a string), then validate."""
        coerce_fields(self)
        self.validate()

    def validate(self) -> None:
        """Refuse option values out of range (ValueError naming the option); subclasses extend it."""
        from proxykd_fast.losses import BACKENDS

        check_choice("dtype", self.dtype, DTYPES)
        check_choice("backend", self.backend, BACKENDS)
        check_range("chunk_size", self.chunk_size, 1)
        check_range("per_device_eval_batch_size", self.per_device_eval_batch_size, 1)
        check_range("max_length", self.max_length, 2)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config from a dict of option names or aliases, refusing unknown keys ("did you mean")."""
        from proxykd_fast.argparsing import config_from_mapping

        return config_from_mapping(cls, dict(data))

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, **overrides: Any) -> C:
        """Load a YAML file of options (names or aliases; a TRL config works, its env: block is applied) with
        keyword overrides on top."""
        from proxykd_fast.argparsing import config_from_mapping, read_config_file
        from proxykd_fast.options import alias_map, resolve_names

        over = resolve_names(cls, {k: v for k, v in overrides.items() if v is not None})
        aliases = alias_map(cls)
        data = {k: v for k, v in read_config_file(path).items() if aliases.get(k, k) not in over}
        return config_from_mapping(cls, {**data, **over}, where=str(path))

    @classmethod
    def parse_args(cls: type[C], argv: list[str]) -> C:
        """The config from command-line flags (and `--config file.yaml`), as `proxykd <stage>` parses them."""
        from proxykd_fast.argparsing import ConfigParser

        return ConfigParser(cls).parse(argv)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for logging and saving next to outputs)."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (loadable with --config)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


@config_dataclass
class TrainConfig(StageConfig):
    """Training options shared by align-proxy and distill, under TRL's / TrainingArguments' names."""

    output_dir: str = option("proxykd_out", help=(
        "directory of the final model (from_pretrained-loadable, LoRA merged), checkpoints, metrics.jsonl and the "
        "saved run config; align-proxy keeps each phase's checkpoints and metrics in sft/ and round-N/"))
    seed: int = option(0, help=(
        "seed of torch (initialisation, sampling) and of the data order, a pure function of (seed, epoch) so a "
        "resume sees the same batches"))
    learning_rate: float = option(1e-4, help=(
        "AdamW learning rate (align-proxy: of the SFT warm-up, and of the DPO rounds unless "
        "--round-learning-rate)"))
    weight_decay: float = option(0.0, help="AdamW weight decay (0: none)")
    lr_scheduler_type: str = option("constant", aliases=("lr_scheduler",), help=(
        "transformers scheduler name: constant, linear, cosine, cosine_with_restarts, polynomial, "
        "constant_with_warmup, inverse_sqrt, ...; it restarts in each align-proxy phase"))
    warmup_steps: int = option(0, help=(
        "learning-rate warm-up steps of the scheduler (0: from --warmup-ratio; with the constant scheduler they make "
        "it constant_with_warmup); not align-proxy's SFT warm-up, see --warmup-steps-sft"))
    warmup_ratio: float = option(0.0, help=(
        "warm-up as a fraction of each phase's steps (rounded up), used when --warmup-steps is 0"))
    per_device_train_batch_size: int = option(8, aliases=("batch_size",), help=(
        "micro-batch size per process; an optimizer step sees per_device_train_batch_size * "
        "gradient_accumulation_steps * processes samples"))
    gradient_accumulation_steps: int = option(1, aliases=("grad_accum",), help=(
        "micro-batches accumulated per optimizer step (exact: the loss is normalised by the global token / pair "
        "count)"))
    max_steps: int = option(0, help=(
        "optimizer steps of the run (align-proxy: of each phase without its own step count), overriding the "
        "epochs; 0 (or -1, TrainingArguments' default): from the epochs"))
    num_train_epochs: float = option(1.0, aliases=("num_epochs",), help=(
        "passes over the training split when max_steps is 0 (fractions allowed); align-proxy uses "
        "--warmup-epochs and --round-epochs instead"))
    max_grad_norm: float = option(1.0, help="clip the gradient norm to this value; 0: no clipping")
    bf16: bool = option(False, help=(
        "bf16 autocast mixed precision for the model's forward (accelerate mixed_precision='bf16'; the weights, "
        "the fused losses and the optimizer stay in --dtype)"))
    gradient_checkpointing: bool = option(False, help=(
        "recompute the decoder layers' activations in the backward (transformers' gradient checkpointing, "
        "use_reentrant=False): less memory, one more forward"))
    lora: dict | None = option(None, help=(
        "peft LoraConfig keyword arguments, e.g. '{\"r\": 16, \"lora_alpha\": 32}'; target_modules defaults to "
        "all-linear and task_type to CAUSAL_LM; adapters on lm_head are refused (the fused losses read the head "
        "weight); merged into the saved model; unset: full fine-tuning"))
    eval_data: str | None = option(None, help=(
        "held-out teacher records (formats as --data) scored by per-token NLL; align-proxy also scores them before "
        "and after each phase, to revert a round that made them worse"))
    eval_steps: int = option(0, aliases=("eval_every",), help=(
        "held-out evaluation every N optimizer steps and at the last one (needs --eval-data); 0: none during "
        "training"))
    early_stopping_patience: int = option(0, help=(
        "stop after N evaluations in a row without a new best held-out NLL; the best weights are restored at the "
        "end; 0: off"))
    save_steps: int = option(0, aliases=("save_every",), help=(
        "checkpoint every N optimizer steps into the run's checkpoints/ dir; 0: no checkpoints"))
    save_total_limit: int | None = option(2, help=(
        "checkpoints kept, the newest N (--resume falls back to an older one when the newest is broken); "
        "null: all"))
    resume_from_checkpoint: bool | str = option(False, aliases=("resume",), help=RESUME_HELP)
    max_steps_this_run: int = option(0, help=(
        "stop after N optimizer steps in this invocation (exit code 3, unfinished; continue with --resume from "
        "the last --save-steps checkpoint); 0: no limit"))
    logging_steps: int = option(1, aliases=("log_every",), help=(
        "write a metrics row every N optimizer steps (evaluation steps always)"))
    report_to: str | list[str] = option("none", help=(
        "none, tensorboard or wandb, or several (a list, or a comma list); metrics.jsonl is always written; a "
        "reporter whose package is missing is refused before training"))

    PATH_OPTIONS: ClassVar[tuple[str, ...]] = ("output_dir", "eval_data")

    def __post_init__(self) -> None:
        """Accept TrainingArguments' list form of report_to and its max_steps=-1, then coerce and validate."""
        if isinstance(self.report_to, (list, tuple)):
            self.report_to = ",".join(str(r) for r in self.report_to) or "none"
        if self.max_steps in (-1, "-1"):
            self.max_steps = 0
        super().__post_init__()

    def validate(self) -> None:
        """Ranges and choices of the training options."""
        super().validate()
        check_range("learning_rate", self.learning_rate, 0)
        check_range("weight_decay", self.weight_decay, 0)
        check_choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        for name in ("warmup_steps", "max_steps", "eval_steps", "early_stopping_patience", "save_steps",
                     "max_steps_this_run"):
            check_range(name, getattr(self, name), 0)
        check_range("warmup_ratio", self.warmup_ratio, 0, 1)
        check_range("per_device_train_batch_size", self.per_device_train_batch_size, 1)
        check_range("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        check_range("save_total_limit", self.save_total_limit, 1)
        check_range("logging_steps", self.logging_steps, 1)
        check_range("num_train_epochs", self.num_train_epochs, 0, low_open=True)
        check_range("max_grad_norm", self.max_grad_norm, 0)
        check_resume("resume_from_checkpoint", self.resume_from_checkpoint)
        for name in (r.strip() for r in str(self.report_to).split(",")):
            check_choice("report_to", name, REPORTERS)


def check_resume(option_name: str, value: Any) -> None:
    """Refuse a resume value other than true, false or 'auto' (a checkpoint path says why)."""
    if value is True or value is False or value == "auto":
        return
    hint = (": a checkpoint path is not accepted, the run resumes from its newest intact checkpoint in output_dir"
            if isinstance(value, str) and ("/" in value or Path(value).exists()) else "")
    raise ValueError(f"option {option_name!r} must be true, false or 'auto'; got {value!r}{hint}")


@config_dataclass
class AlignProxyConfig(TrainConfig):
    """Proxy alignment: SFT warm-up on teacher data, then K rounds of NLL + DPO(teacher vs proxy sample)."""

    proxy: str = option("", aliases=("model_name_or_path",), help=(
        "white-box proxy model to align, a Hugging Face id or local dir; its tokenizer reads --data (required)"))
    data: str = option("", aliases=("dataset_name",), help=DATA_HELP + " (required)")
    warmup_split: str = option("0:0.1", help="slice of --data for the SFT warm-up (paper: 10%%)")
    align_split: str = option("0.1:0.55", help="slice of --data for the DPO rounds (paper: 45%%)")
    warmup_steps_sft: int = option(0, help=(
        "optimizer steps of the SFT warm-up; 0: max_steps if set, else --warmup-epochs"))
    warmup_epochs: float = option(1.0, help="passes over warmup_split in the SFT warm-up (fractions allowed)")
    rounds: int = option(2, help=(
        "K rounds of NLL + DPO after the warm-up; each samples fresh rejected answers from the current proxy, which "
        "is also the round's frozen reference; 0: SFT warm-up only"))
    round_epochs: float = option(1.0, help="passes over align_split per DPO round (fractions allowed)")
    round_steps: int = option(0, help="optimizer steps per DPO round; 0: max_steps if set, else --round-epochs")
    round_learning_rate: float | None = option(None, help=(
        "learning rate of the DPO rounds; unset or 0: --learning-rate"))
    beta: float = option(0.1, help="DPO beta (> 0): scale of the policy-minus-reference log-ratio margin")
    nll_alpha: float = option(1.0, help=(
        "weight of the per-token NLL of the teacher (chosen) answers added to the mean DPO loss; 0: DPO only"))
    dpo_loss_type: str = option("sigmoid", aliases=("loss_type",), help="sigmoid, ipo, hinge, robust or apo_zero")
    label_smoothing: float = option(0.0, help=(
        "DPO label smoothing in [0, 0.5) (conservative DPO; loss types sigmoid and robust only)"))
    average_log_prob: bool = option(False, help=(
        "DPO compares per-token mean log-probs instead of sums (ipo always uses means)"))
    dataset_rejected: str = option("refuse", help=(
        "what a rejected column in --data does: refuse (stop with a message; the rounds sample their own rejected "
        "answers), first_round (round 1 trains on the dataset's rejected answers instead of sampling; later rounds "
        "sample), ignore (every round samples)"))
    gen_max_new_tokens: int = option(256, help="most new tokens of each sampled rejected answer")
    gen_temperature: float = option(1.0, help="sampling temperature (> 0) of the rejected answers")
    gen_top_p: float = option(1.0, help="nucleus top-p in (0, 1] of the rejected-answer sampling (1: off)")
    gen_top_k: int = option(0, help="top-k of the rejected-answer sampling (0: off)")
    gen_batch_size: int = option(32, help="prompts per generate call when sampling rejected answers")
    keep_round_if_worse: bool = option(False, help=(
        "keep a DPO round that raised the held-out NLL; without it such a round is reverted and the rounds stop "
        "(needs --eval-data)"))

    PATH_OPTIONS: ClassVar[tuple[str, ...]] = ("output_dir", "eval_data", "proxy", "data")

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
        check_choice("dataset_rejected", self.dataset_rejected, DATASET_REJECTED)
        check_range("gen_max_new_tokens", self.gen_max_new_tokens, 1)
        check_range("gen_temperature", self.gen_temperature, 0, low_open=True)
        check_range("gen_top_p", self.gen_top_p, 0, 1, low_open=True)
        check_range("gen_batch_size", self.gen_batch_size, 1)


@config_dataclass
class PrecomputeConfig(StageConfig):
    """Offline proxy targets: per-token top-k log-probs and per-sample log-likelihoods and weights."""

    proxy: str = option("", aliases=("model_name_or_path",), help=(
        "aligned proxy model, e.g. align-proxy's output_dir, or a Hugging Face id (required)"))
    data: str = option("", aliases=("dataset_name",), help=DATA_HELP + " (required)")
    output_dir: str = option("proxykd_targets", help=(
        "directory of the target shards, weights.parquet and manifest.json (distill --targets)"))
    tokenizer: str | None = option(None, help=(
        "tokenizer of the records (the student's); must have the proxy's exact vocabulary; unset: the proxy's"))
    top_k: int = option(10, help=(
        "log-probs stored per answer token (the proxy's k most likely ids); distill renormalises over them"))
    per_device_eval_batch_size: int = option(16, aliases=("batch_size", "eval_batch_size"), help=(
        "examples per proxy forward pass"))
    shard_size: int = option(1024, help="examples per shard file (a shard is the unit --resume keeps)")
    format: str = option("parquet", help="shard file format: parquet or safetensors")
    loglik: str = option("sum", help=LOGLIK_HELP + "; distill recomputes the weights when its --loglik differs")
    normalize_weights: bool = option(False, help=(
        NORMALIZE_HELP + "; distill recomputes the weights when its setting differs"))
    split: str = option("0.55:1", help=STUDENT_SPLIT_HELP)
    resume: bool | str = option(False, aliases=("resume_from_checkpoint",), help=(
        "true: keep the shards already written (the stored run info must match), refused when no run is recorded "
        "in output_dir; auto: the same, or start fresh (saying so) when none is; false: delete existing shards "
        "first"))

    PATH_OPTIONS: ClassVar[tuple[str, ...]] = ("output_dir", "proxy", "data", "tokenizer")

    def validate(self) -> None:
        """Ranges and choices of the precompute options."""
        super().validate()
        check_range("top_k", self.top_k, 1)
        check_range("shard_size", self.shard_size, 1)
        check_choice("format", self.format, ("parquet", "safetensors"))
        check_choice("loglik", self.loglik, ("sum", "mean"))
        check_split_spec("split", self.split)
        check_resume("resume", self.resume)


@config_dataclass
class DistillConfig(TrainConfig):
    """Student distillation: NLL + alpha * w * KL(proxy || student) on offline targets or an online proxy."""

    student: str = option("", aliases=("model_name_or_path",), help=(
        "student model to train, a Hugging Face id or local dir; its tokenizer reads the data (required)"))
    targets: str | None = option(None, help=(
        "precompute output dir: offline top-k targets and weights (ignored when --proxy is given)"))
    proxy: str | None = option(None, aliases=("teacher_model_name_or_path",), help=(
        "online proxy model, run without grad on every batch: its full distribution (needed by reverse_kl and "
        "jsd); takes precedence over --targets"))
    data: str | None = option(None, aliases=("dataset_name",), help=(
        DATA_HELP + "; read with an online --proxy or --alpha 0 (offline targets carry their tokens)"))
    split: str = option("0.55:1", help=STUDENT_SPLIT_HELP + " (online proxy / --alpha 0 only: offline targets were "
                                                            "split by precompute)")
    alpha: float = option(100.0, help=(
        "weight of the KD term in NLL + alpha * w * T^2 * KL(proxy || student) (the paper uses 100); 0: plain SFT "
        "on the teacher answers, needing only --data"))
    temperature: float = option(1.0, help=(
        "T (> 0): the KD term compares both distributions softened by T and is scaled by T^2; the NLL uses T = 1"))
    divergence: str = option("forward_kl", help=(
        "forward_kl = KL(proxy || student) (the paper); reverse_kl and jsd need an online --proxy"))
    jsd_beta: float = option(0.5, help=(
        "b in (0, 1) of divergence=jsd: b * KL(p || m) + (1 - b) * KL(q || m) with m = b * p + (1 - b) * q (p proxy, "
        "q student)"))
    use_weights: bool = option(True, aliases=("weights",), help=(
        "per-sample weights w = sigmoid((loglik - mu) / sigma) from the proxy's log-likelihood of each teacher "
        "answer; --no-use-weights (or --no-weights, the ablation): w = 1"))
    weight_stats: str = option("dataset", help=(
        "mu/sigma of the weights over the whole training set (dataset) or each micro-batch (batch)"))
    loglik: str = option("sum", help=LOGLIK_HELP)
    normalize_weights: bool = option(False, help=NORMALIZE_HELP)

    PATH_OPTIONS: ClassVar[tuple[str, ...]] = ("output_dir", "eval_data", "student", "targets", "proxy", "data")

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


@config_dataclass
class EvalConfig(StageConfig):
    """Evaluation: held-out NLL of teacher answers, KL to a reference model, generation samples."""

    model: str = option("", aliases=("model_name_or_path",), help=(
        "model to evaluate, a Hugging Face id or local dir (required)"))
    data: str = option("", aliases=("dataset_name",), help=DATA_HELP + " (required)")
    output: str | None = option(None, help="also write the result JSON to this file (it is always printed)")
    reference: str | None = option(None, help=(
        "reference model with the same vocabulary: report per-token KL(reference || model) and NLL; unset: NLL "
        "only"))
    per_device_eval_batch_size: int = option(32, aliases=("batch_size", "eval_batch_size"), help=(
        "examples per forward pass"))
    num_samples: int = option(4, help=(
        "greedy generations shown next to the teacher's answers, for the first N examples (0: none)"))
    max_new_tokens: int = option(64, help="most new tokens of each generation sample")
    split: str = option("0:1", help=(
        "slice of --data evaluated, 'start:stop' as fractions (or counts when > 1); 0:1: all of it"))

    PATH_OPTIONS: ClassVar[tuple[str, ...]] = ("model", "data", "reference", "output")

    def validate(self) -> None:
        """Ranges and choices of the evaluation options."""
        super().validate()
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
    "parse_split",
]
