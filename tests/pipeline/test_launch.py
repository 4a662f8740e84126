"""The `accelerate launch` configs of examples/accelerate/: what each one sets, the stages adopt (mixed precision,
FSDP2 and its resharding, activation checkpointing), and launch settings the stages cannot honour are refused.

The environment of each config is the one accelerate's own launcher computes from the file
(`_validate_launch_command` + `prepare_multi_gpu_env`), so a config accelerate reads differently fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxykd_fast.pipeline import DistillConfig, EvalConfig, PipelineError
from proxykd_fast.pipeline.bootstrap import launch_settings

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "accelerate"
LAUNCH_VARS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD",
               "FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING")
# config file -> (fsdp, mixed_precision, gradient_checkpointing) a training stage runs with
EXPECTED = {"ddp.yaml": (False, "bf16", False), "fsdp2.yaml": ("full_shard", "bf16", False),
            "fsdp2_checkpointing.yaml": ("full_shard", "bf16", True),
            "fsdp2_shard_grad_op.yaml": ("shard_grad_op", "bf16", False)}


def launch_env(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file config -m proxykd_fast.cli distill` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "proxykd_fast.cli", "distill"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 8 and args.module
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k in LAUNCH_VARS}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_every_example_config_is_covered() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_config_settings_are_adopted(name: str, clean_env: pytest.MonkeyPatch) -> None:
    for key, value in launch_env(CONFIGS / name).items():
        clean_env.setenv(key, value)
    cfg = launch_settings(DistillConfig())
    assert (cfg.fsdp, cfg.mixed_precision, cfg.gradient_checkpointing) == EXPECTED[name]
    assert cfg.bf16  # TrainingArguments' switch follows
    ev = launch_settings(EvalConfig())  # no-grad stages: sharding and precision, no checkpointing to set
    assert (ev.fsdp, ev.mixed_precision) == EXPECTED[name][:2]
    same = launch_settings(DistillConfig(fsdp=EXPECTED[name][0], bf16=True))  # flags that agree are fine
    assert same.fsdp == EXPECTED[name][0]


@pytest.mark.parametrize(("env", "flags", "match"), [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {}, "FSDP version 1"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, {}, "offload"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"},
     {"fsdp": "shard_grad_op"}, "shards as full_shard"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, {"mixed_precision": "fp16"}, "mixed_precision 'bf16'"),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, {}, "fp8"),
])
def test_launch_settings_the_stages_cannot_honour_are_refused(env: dict[str, str], flags: dict[str, str], match: str,
                                                               clean_env: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        clean_env.setenv(key, value)
    with pytest.raises(PipelineError, match=match):
        launch_settings(DistillConfig(**flags))


def test_without_a_launch_config_the_flags_decide(clean_env: pytest.MonkeyPatch) -> None:
    cfg = DistillConfig(fsdp="full_shard auto_wrap", fp16=True)
    assert launch_settings(cfg) is cfg and cfg.fsdp == "full_shard" and cfg.mixed_precision == "fp16"
