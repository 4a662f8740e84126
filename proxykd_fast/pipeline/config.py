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

C = TypeVar("C", bound="StageConfig")


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    """The resolved annotation of a dataclass field, with Optional unwrapped."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


@dataclass
class StageConfig:
    """Base class: YAML loading, flag generation and validation shared by every stage."""

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
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping of options")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

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
    resume: bool = False
    max_steps_this_run: int = 0
    log_every: int = 1
    report_to: str = "none"
    progress: bool = True
    chunk_size: int | None = None
    backend: str = "auto"


@dataclass
class AlignProxyConfig(TrainConfig):
    """Proxy alignment: SFT warm-up on teacher data, then K rounds of NLL + DPO(teacher vs proxy sample)."""

    proxy: str = ""
    data: str = ""
    warmup_split: str = "0:0.1"
    align_split: str = "0.1:0.55"
    warmup_steps_sft: int = 0
    warmup_epochs: float = 1.0
    rounds: int = 2
    round_epochs: float = 1.0
    round_steps: int = 0
    round_learning_rate: float | None = None
    beta: float = 0.1
    nll_alpha: float = 1.0
    dpo_loss_type: str = "sigmoid"
    average_log_prob: bool = False
    gen_max_new_tokens: int = 256
    gen_temperature: float = 1.0
    gen_top_p: float = 1.0
    gen_batch_size: int = 32
    keep_round_if_worse: bool = False


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
    split: str = "0:1"


@dataclass
class DistillConfig(TrainConfig):
    """Student distillation: NLL + alpha * w * KL(proxy || student) on offline targets or an online proxy."""

    student: str = ""
    targets: str | None = None
    proxy: str | None = None
    data: str | None = None
    split: str = "0:1"
    alpha: float = 100.0
    temperature: float = 1.0
    use_weights: bool = True
    top_k: int = 10
    weight_stats: str = "dataset"
    loglik: str = "sum"
    normalize_weights: bool = False


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
