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
STUDENT_SPLIT_HELP = ("slice of --data used, 'start:stop' as fractions (or counts when > 1); the default 0.55:1 "
                      "is the paper's student share: align-proxy uses 0:0.1 (warm-up) and 0.1:0.55 (alignment)")


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
            helptext = f.metadata.get("help", "")
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

    output_dir: str = "proxykd_out"
    seed: int = 0
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 0
    num_epochs: float = 1.0
    max_length: int = 1024
    max_grad_norm: float = 1.0
    dtype: str = "float32"
    lora: dict | None = None
    eval_data: str | None = None
    eval_every: int = 0
    eval_batch_size: int = 32
    early_stopping_patience: int = 0
    save_every: int = 0
    resume: bool = field(default=False, metadata={
        "help": "continue from the latest checkpoint (the stored run config must match); without it the "
                "stage's checkpoints, phase markers and metrics in output_dir are cleared first"})
    max_steps_this_run: int = 0
    log_every: int = 1
    report_to: str = "none"
    progress: bool = True
    chunk_size: int | None = None
    backend: str = "auto"

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

    proxy: str = ""
    data: str = ""
    warmup_split: str = field(default="0:0.1", metadata={"help": "slice of --data for the SFT warm-up (paper: 10%%)"})
    align_split: str = field(default="0.1:0.55", metadata={"help": "slice of --data for the DPO rounds (paper: 45%%)"})
    warmup_steps_sft: int = 0
    warmup_epochs: float = 1.0
    rounds: int = 2
    round_epochs: float = 1.0
    round_steps: int = 0
    round_learning_rate: float | None = None
    beta: float = 0.1
    nll_alpha: float = 1.0
    dpo_loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid, ipo, hinge, robust or apo_zero"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "DPO label smoothing in [0, 0.5) (conservative DPO; loss types sigmoid and robust only)"})
    average_log_prob: bool = False
    gen_max_new_tokens: int = 256
    gen_temperature: float = 1.0
    gen_top_p: float = 1.0
    gen_top_k: int = field(default=0, metadata={"help": "top-k of the rejected-answer sampling (0: off)"})
    gen_batch_size: int = 32
    keep_round_if_worse: bool = False

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

    proxy: str = ""
    data: str = ""
    output_dir: str = "proxykd_targets"
    tokenizer: str | None = None
    top_k: int = 10
    batch_size: int = 16
    shard_size: int = 1024
    max_length: int = 1024
    format: str = "parquet"
    weight_stats: str = "dataset"
    loglik: str = "sum"
    normalize_weights: bool = False
    dtype: str = "float32"
    progress: bool = True
    chunk_size: int | None = None
    backend: str = "auto"
    split: str = field(default="0.55:1", metadata={"help": STUDENT_SPLIT_HELP})
    resume: bool = field(default=False, metadata={
        "help": "keep the shards already written (the stored run info must match); without it existing "
                "shards in output_dir are deleted first"})

    def validate(self) -> None:
        """Ranges and choices of the precompute options."""
        _check_common(self)
        check_range("top_k", self.top_k, 1)
        check_range("shard_size", self.shard_size, 1)
        check_choice("format", self.format, ("parquet", "safetensors"))
        check_choice("weight_stats", self.weight_stats, ("dataset", "batch"))
        check_choice("loglik", self.loglik, ("sum", "mean"))
        check_split_spec("split", self.split)


@dataclass
class DistillConfig(TrainConfig):
    """Student distillation: NLL + alpha * w * KL(proxy || student) on offline targets or an online proxy."""

    student: str = ""
    targets: str | None = None
    proxy: str | None = None
    data: str | None = None
    split: str = field(default="0.55:1", metadata={"help": STUDENT_SPLIT_HELP + " (online proxy / --alpha 0 only: "
                                                           "offline targets were split by precompute)"})
    alpha: float = 100.0
    temperature: float = 1.0
    divergence: str = field(default="forward_kl", metadata={
        "help": "forward_kl = KL(proxy || student) (the paper); reverse_kl and jsd need an online --proxy"})
    jsd_beta: float = 0.5
    use_weights: bool = True
    top_k: int = 10
    weight_stats: str = field(default="dataset", metadata={
        "help": "mu/sigma of the weights over the whole training set (dataset) or each micro-batch (batch)"})
    loglik: str = "sum"
    normalize_weights: bool = False

    def validate(self) -> None:
        """Ranges and choices of the distillation options."""
        from proxykd_fast.losses._validation import DIVERGENCES

        super().validate()
        check_split_spec("split", self.split)
        check_range("alpha", self.alpha, 0)
        check_range("temperature", self.temperature, 0, low_open=True)
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_range("jsd_beta", self.jsd_beta, 0, 1, low_open=True, high_open=True)
        check_range("top_k", self.top_k, 1)
        check_choice("weight_stats", self.weight_stats, ("dataset", "batch"))
        check_choice("loglik", self.loglik, ("sum", "mean"))


@dataclass
class EvalConfig(StageConfig):
    """Evaluation: held-out NLL of teacher answers, KL to a reference model, generation samples."""

    model: str = ""
    data: str = ""
    output: str | None = None
    reference: str | None = None
    batch_size: int = 32
    max_length: int = 1024
    num_samples: int = 4
    max_new_tokens: int = 64
    split: str = "0:1"
    dtype: str = "float32"
    progress: bool = True
    chunk_size: int | None = None
    backend: str = "auto"

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
