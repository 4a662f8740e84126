"""Stage configs: YAML values coerced to the annotated types, bad values refused with the option's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxykd_fast.pipeline.config import (
    LR_SCHEDULERS,
    AlignProxyConfig,
    DistillConfig,
    EvalConfig,
    PrecomputeConfig,
    TrainConfig,
)


def test_yaml_strings_are_coerced_to_the_field_types(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    # PyYAML reads 1e-5 (no dot) as a string; quoted numbers and yes/no booleans are common too.
    path.write_text("learning_rate: 1e-5\nbatch_size: '4'\nmax_steps: 1e3\nuse_weights: 'no'\nchunk_size: null\n"
                    "lora: '{\"r\": 2}'\n")
    cfg = DistillConfig.from_yaml(path)
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.batch_size == 4 and cfg.max_steps == 1000 and cfg.use_weights is False
    assert cfg.chunk_size is None and cfg.lora == {"r": 2}
    assert TrainConfig(learning_rate=1).learning_rate == 1.0  # Python construction is coerced as well


@pytest.mark.parametrize(("cls", "values", "match"), [
    (DistillConfig, {"learning_rate": "fast"}, "'learning_rate' expects a number"),
    (DistillConfig, {"batch_size": 2.5}, "'batch_size' expects an integer"),
    (DistillConfig, {"batch_size": 0}, "'batch_size' must be"),
    (DistillConfig, {"use_weights": "maybe"}, "'use_weights' expects a boolean"),
    (DistillConfig, {"split": 1}, "'split' expects a string"),
    (DistillConfig, {"split": "half"}, "'split' must look like"),
    (DistillConfig, {"lr_scheduler": "cosine_annealing"}, "'lr_scheduler' must be one of"),
    (DistillConfig, {"divergence": "kl"}, "'divergence' must be one of"),
    (DistillConfig, {"report_to": "mlflow"}, "'report_to' must be one of"),
    (DistillConfig, {"dtype": "int8"}, "'dtype' must be one of"),
    (AlignProxyConfig, {"dpo_loss_type": "kto"}, "'dpo_loss_type' must be one of sigmoid, ipo"),
    (AlignProxyConfig, {"label_smoothing": 0.6}, "'label_smoothing' must be"),
    (AlignProxyConfig, {"label_smoothing": 0.1, "dpo_loss_type": "hinge"}, "'label_smoothing' needs"),
    (AlignProxyConfig, {"gen_top_k": -1}, "'gen_top_k' must be"),
    (PrecomputeConfig, {"format": "csv"}, "'format' must be one of"),
    (EvalConfig, {"max_new_tokens": 0}, "'max_new_tokens' must be"),
])
def test_bad_values_name_the_option(cls: type, values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls.from_dict(values)


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
    import argparse
    import dataclasses

    assert [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")] == []
    parser = argparse.ArgumentParser()
    cls.add_arguments(parser)
    text = " ".join(parser.format_help().split())  # also checks that no help text breaks %-formatting
    assert "(default: 1024)" in text and "(default: auto)" in text


def test_backend_help_names_every_backend() -> None:
    from proxykd_fast.losses import BACKENDS
    from proxykd_fast.pipeline.config import BACKEND_HELP

    assert all(name in BACKEND_HELP for name in BACKENDS)
