"""Stage configs: TRL names and old aliases, YAML values coerced, bad values and unknown names refused clearly."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from proxykd_fast.argparsing import ConfigError, ConfigParser
from proxykd_fast.pipeline.config import (
    LR_SCHEDULERS,
    AlignProxyConfig,
    DistillConfig,
    EvalConfig,
    PrecomputeConfig,
    TrainConfig,
)

# The shared options every stage takes, under TRL's / TrainingArguments' names.
TRL_NAMES = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
             "max_steps", "max_length", "logging_steps", "save_steps", "save_total_limit", "report_to", "bf16",
             "gradient_checkpointing", "seed", "output_dir", "resume_from_checkpoint")
OLD_NAMES = {"batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
             "num_epochs": "num_train_epochs", "log_every": "logging_steps", "save_every": "save_steps",
             "eval_every": "eval_steps", "eval_batch_size": "per_device_eval_batch_size", "resume": "resume_from_checkpoint",
             "lr_scheduler": "lr_scheduler_type"}


def test_yaml_strings_are_coerced_to_the_field_types(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    # PyYAML reads 1e-5 (no dot) as a string; quoted numbers and yes/no booleans are common too.
    path.write_text("learning_rate: 1e-5\nbatch_size: '4'\nmax_steps: 1e3\nuse_weights: 'no'\nchunk_size: null\n"
                    "lora: '{\"r\": 2}'\n")
    cfg = DistillConfig.from_yaml(path)
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.per_device_train_batch_size == 4 and cfg.max_steps == 1000 and cfg.use_weights is False
    assert cfg.chunk_size is None and cfg.lora == {"r": 2}
    assert TrainConfig(learning_rate=1).learning_rate == 1.0  # Python construction is coerced as well
    same = DistillConfig.parse_args(["--config", str(path)])  # the command line reads the file the same way
    assert same == cfg


@pytest.mark.parametrize(("cls", "values", "match"), [
    (DistillConfig, {"learning_rate": "fast"}, "'learning_rate' expects a number"),
    (DistillConfig, {"batch_size": 2.5}, "'batch_size' expects an integer"),
    (DistillConfig, {"per_device_train_batch_size": 0}, "'per_device_train_batch_size' must be"),
    (DistillConfig, {"use_weights": "maybe"}, "'use_weights' expects a boolean"),
    (DistillConfig, {"split": 1}, "'split' expects a string"),
    (DistillConfig, {"split": "half"}, "'split' must look like"),
    (DistillConfig, {"lr_scheduler_type": "cosine_annealing"}, "'lr_scheduler_type' must be one of"),
    (DistillConfig, {"divergence": "kl"}, "'divergence' must be one of"),
    (DistillConfig, {"report_to": "mlflow"}, "'report_to' must be one of"),
    (DistillConfig, {"dtype": "int8"}, "'dtype' must be one of"),
    (DistillConfig, {"warmup_ratio": 1.5}, "'warmup_ratio' must be"),
    (DistillConfig, {"resume_from_checkpoint": "runs/x/checkpoints/step-5"}, "checkpoint path is not accepted"),
    (AlignProxyConfig, {"dpo_loss_type": "kto"}, "'dpo_loss_type' must be one of sigmoid, ipo"),
    (AlignProxyConfig, {"label_smoothing": 0.6}, "'label_smoothing' must be"),
    (AlignProxyConfig, {"label_smoothing": 0.1, "dpo_loss_type": "hinge"}, "'label_smoothing' needs"),
    (AlignProxyConfig, {"gen_top_k": -1}, "'gen_top_k' must be"),
    (AlignProxyConfig, {"dataset_rejected": "use"}, "'dataset_rejected' must be one of"),
    (PrecomputeConfig, {"format": "csv"}, "'format' must be one of"),
    (EvalConfig, {"max_new_tokens": 0}, "'max_new_tokens' must be"),
])
def test_bad_values_name_the_option(cls: type, values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls.from_dict(values)


def test_trl_names_are_the_fields_and_the_old_names_aliases(tmp_path: Path) -> None:
    import trl
    from transformers import TrainingArguments

    hf = {f.name for f in dataclasses.fields(TrainingArguments)} | {f.name for f in dataclasses.fields(trl.SFTConfig)}
    assert set(TRL_NAMES) <= hf  # they are TRL's spellings ...
    for cls in (AlignProxyConfig, DistillConfig):
        assert set(TRL_NAMES) <= {f.name for f in dataclasses.fields(cls)}  # ... and ours
    old = {k: v for k, v in {"batch_size": 3, "grad_accum": 2, "num_epochs": 2.0, "log_every": 5, "save_every": 4,
                             "eval_every": 6, "eval_batch_size": 7, "resume": True, "lr_scheduler": "linear"}.items()}
    by_python = DistillConfig(**old)
    yaml_path = tmp_path / "old.yaml"
    yaml_path.write_text("".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in old.items()))
    by_yaml = DistillConfig.from_yaml(yaml_path)
    flags = [x for k, v in old.items() for x in (["--" + k.replace("_", "-")] if v is True
                                                 else ["--" + k.replace("_", "-"), str(v)])]
    by_flags = DistillConfig.parse_args(flags)
    for cfg in (by_python, by_yaml, by_flags):
        assert {new: getattr(cfg, new) for new in OLD_NAMES.values()} == {OLD_NAMES[k]: v for k, v in old.items()}
    with pytest.raises(ValueError, match="given twice"):
        DistillConfig(batch_size=2, per_device_train_batch_size=3)


def test_a_trl_yaml_works_as_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROXYKD_TEST_ENV", raising=False)
    path = tmp_path / "sft.yaml"
    path.write_text(
        "# the shared part of a TRL SFT config\n"
        "model_name_or_path: Qwen/Qwen2.5-0.5B\ndataset_name: data/teacher\nlearning_rate: 2.0e-5\n"
        "per_device_train_batch_size: 4\ngradient_accumulation_steps: 8\nnum_train_epochs: 3\nmax_steps: -1\n"
        "max_length: 512\nlogging_steps: 10\nsave_steps: 100\nsave_total_limit: 3\nreport_to: [none]\nbf16: true\n"
        "gradient_checkpointing: true\nseed: 42\noutput_dir: runs/sft\nresume_from_checkpoint: false\n"
        "lr_scheduler_type: cosine\nwarmup_ratio: 0.1\nenv:\n  PROXYKD_TEST_ENV: set\n")
    cfg = DistillConfig.parse_args(["--config", str(path), "--learning-rate", "3e-5"])
    assert cfg.max_steps == 0  # TrainingArguments' -1: from the epochs
    assert os.environ["PROXYKD_TEST_ENV"] == "set"  # TRL's env: block
    assert (cfg.student, cfg.data, cfg.learning_rate, cfg.per_device_train_batch_size) == (
        "Qwen/Qwen2.5-0.5B", "data/teacher", 3e-5, 4)
    assert (cfg.gradient_accumulation_steps, cfg.num_train_epochs, cfg.max_length, cfg.logging_steps) == (8, 3.0, 512, 10)
    assert (cfg.save_steps, cfg.save_total_limit, cfg.report_to, cfg.bf16, cfg.gradient_checkpointing) == (
        100, 3, "none", True, True)
    assert (cfg.seed, cfg.output_dir, cfg.resume_from_checkpoint, cfg.lr_scheduler_type, cfg.warmup_ratio) == (
        42, "runs/sft", False, "cosine", 0.1)
    align = AlignProxyConfig.parse_args(["--config", str(path)])
    assert align.proxy == "Qwen/Qwen2.5-0.5B" and align.data == "data/teacher"


@pytest.mark.parametrize(("text", "match"), [
    ("learnig_rate: 1e-4\n", "unknown DistillConfig option 'learnig_rate' \\(did you mean 'learning_rate'\\?\\)"),
    ("batch_sise: 4\n", "did you mean 'batch_size', an alias of 'per_device_train_batch_size'"),
    ("per_device_train_batch_size: many\n", "'per_device_train_batch_size' expects an integer, got 'many'"),
    ("- a list\n", "expected a YAML mapping"),
    ("student: [unclosed\n", "not valid YAML"),
])
def test_config_file_errors_name_the_file_and_the_option(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        DistillConfig.parse_args(["--config", str(path)])
    assert str(path) in str(info.value)


def test_unknown_flags_get_the_closest_valid_one() -> None:
    with pytest.raises(ConfigError, match="unrecognized arguments: --learnig-rate \\(did you mean --learning"):
        DistillConfig.parse_args(["--learnig-rate", "1e-4"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --batch"):  # no silent prefix matching
        DistillConfig.parse_args(["--batch", "4"])
    with pytest.raises(ConfigError, match="'per_device_train_batch_size' expects an integer"):
        DistillConfig.parse_args(["--batch-size", "x"])
    with pytest.raises(ValueError, match="'lr_scheduler_type' must be one of .* \\(did you mean 'cosine'\\?\\)"):
        DistillConfig.parse_args(["--lr-scheduler-type", "cosin"])


def test_flag_forms() -> None:
    cfg = DistillConfig.parse_args(["--report-to", "tensorboard", "wandb", "--lora", '{"r": 2}', "--no-progress",
                                    "--save-total-limit", "null", "--resume", "auto", "--no-weights"])
    assert cfg.report_to == "tensorboard,wandb" and cfg.lora == {"r": 2} and cfg.progress is False
    assert cfg.save_total_limit is None and cfg.resume_from_checkpoint == "auto" and cfg.use_weights is False
    assert DistillConfig.parse_args(["--resume"]).resume_from_checkpoint is True
    assert DistillConfig.parse_args(["--report-to", "tensorboard,wandb"]).report_to == "tensorboard,wandb"
    assert PrecomputeConfig.parse_args(["--batch-size", "3", "--resume"]).per_device_eval_batch_size == 3


def test_student_split_defaults_to_the_papers_share() -> None:
    assert PrecomputeConfig().split == DistillConfig().split == "0.55:1"
    align = AlignProxyConfig()
    assert (align.warmup_split, align.align_split) == ("0:0.1", "0.1:0.55")
    from proxykd_fast.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for stage in ("precompute", "distill"):
        helptext = sub.choices[stage].format_help()
        assert "0.55:1" in " ".join(helptext.split()) and "paper" in helptext


def test_scheduler_names_are_transformers_names() -> None:
    from transformers import SchedulerType

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}


@pytest.mark.parametrize("cls", [TrainConfig, AlignProxyConfig, PrecomputeConfig, DistillConfig, EvalConfig])
def test_every_option_has_help(cls: type) -> None:
    assert [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")] == []
    text = " ".join(ConfigParser(cls).format_help().split())  # also checks that no help text breaks %-formatting
    assert "(default: 1024)" in text and "(default: auto)" in text


def test_backend_help_names_every_backend() -> None:
    from proxykd_fast.losses import BACKENDS
    from proxykd_fast.pipeline.config import BACKEND_HELP

    assert all(name in BACKEND_HELP for name in BACKENDS)


@pytest.mark.parametrize("cls", [AlignProxyConfig, PrecomputeConfig, DistillConfig, EvalConfig])
def test_scale_options_on_every_stage(cls: type) -> None:
    """--mixed-precision (and TrainingArguments' --bf16 / --fp16), --attn-implementation, --packing and --fsdp."""
    cfg = cls.parse_args(["--bf16", "--fsdp", "--padding-free", "--attn-implementation", "eager"])
    assert (cfg.mixed_precision, cfg.bf16, cfg.fp16, cfg.fsdp, cfg.packing, cfg.attn_implementation) == (
        "bf16", True, False, "full_shard", True, "eager")
    assert cls.parse_args(["--mixed-precision", "bf16"]) == cls.parse_args(["--bf16"])  # one setting, two spellings
    cfg = cls.parse_args(["--mixed-precision", "fp16", "--fsdp", "shard_grad_op auto_wrap"])
    assert (cfg.fp16, cfg.bf16, cfg.fsdp) == (True, False, "shard_grad_op")
    assert cls.from_dict({"fsdp": "full_shard auto_wrap", "fp16": True}).fsdp == "full_shard"  # a TRL YAML's value
    assert cls().fsdp is False and cls().mixed_precision == "no" and cls().attn_implementation == "sdpa"


@pytest.mark.parametrize(("values", "match"), [
    ({"bf16": True, "fp16": True}, "'bf16' and 'fp16' are both set"),
    ({"bf16": True, "mixed_precision": "fp16"}, "'bf16' contradicts mixed_precision='fp16'"),
    ({"mixed_precision": "fp8"}, "'mixed_precision' must be one of no, bf16, fp16"),
    ({"attn_implementation": "flash"}, "'attn_implementation' must be one of"),
    ({"fsdp": "offload"}, "CPU offload is not supported"),
    ({"fsdp": "hybrid_shard"}, "hybrid sharding"),
    ({"fsdp": "full_shard shard_grad_op"}, "two sharding modes"),
    ({"fsdp": "ful_shard"}, "did you mean 'full_shard'"),
])
def test_scale_options_refuse_bad_values(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillConfig(**values)
