"""`collect` and `serve-teacher` are parsed like every stage: flags from their dataclasses, `--config` YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from proxykd_fast.argparsing import ConfigError
from proxykd_fast.cli import main as proxykd_main
from proxykd_fast.cli import parse_command
from proxykd_fast.teacher.cli import CollectArgs, ServeConfig
from proxykd_fast.teacher.client import RetryPolicy
from proxykd_fast.teacher.collect import CollectConfig


def test_collect_reads_a_config_file_and_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "collect.yaml"
    path.write_text("prompts: p.jsonl\nout: data/teacher\nbase_url: http://127.0.0.1:8000/v1\nmodel: smollm2\n"
                    "concurrency: 4\ntimeout: '1e1'\nmode: completions\n")
    name, cfg = parse_command(["collect", "--config", str(path), "--concurrency", "2", "--no-model-check",
                               "--summary-json", str(tmp_path / "s.json")])
    assert name == "collect" and isinstance(cfg, CollectArgs) and isinstance(cfg, CollectConfig)
    assert (cfg.prompts, cfg.out, cfg.model, cfg.concurrency, cfg.timeout, cfg.mode) == (
        Path("p.jsonl"), Path("data/teacher"), "smollm2", 2, 10.0, "completions")
    assert cfg.check_model is False and cfg.summary_json == tmp_path / "s.json"


def test_collect_config_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "collect.yaml"
    path.write_text("prompts: p.jsonl\nconcurency: 4\n")
    with pytest.raises(ValueError, match="unknown CollectArgs option 'concurency' \\(did you mean 'concurrency'\\?\\)"):
        parse_command(["collect", "--config", str(path)])
    with pytest.raises(ConfigError, match="required: --out, --base_url/--base-url, --model"):
        parse_command(["collect", "--prompts", "p.jsonl"])
    with pytest.raises(ConfigError, match="'mode' expects one of 'chat', 'completions'"):
        parse_command(["collect", "--prompts", "p", "--out", "o", "--base-url", "u", "--model", "m", "--mode", "chatt"])
    assert proxykd_main(["collect", "--prompts", "p.jsonl", "--concurency", "3"]) == 2
    assert "did you mean --concurrency" in capsys.readouterr().err


def test_retry_defaults_live_in_one_place() -> None:
    _, cli = parse_command(["collect", "--prompts", "p", "--out", "o", "--base-url", "u", "--model", "m"])
    fields = [f.name for f in dataclasses.fields(RetryPolicy)]
    assert cli.retry_policy() == RetryPolicy() == CollectConfig("p", "o", "u", "m").retry_policy()
    assert {f: getattr(cli, f) for f in fields} == dataclasses.asdict(RetryPolicy())


def test_serve_teacher_reads_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(f"model: tiny\nport: 0\nsystem_prompt_file: {tmp_path / 'hidden.txt'}\nmax_batch_size: 4\n")
    name, cfg = parse_command(["serve-teacher", "--config", str(path), "--host", "0.0.0.0"])
    assert isinstance(cfg, ServeConfig) and (cfg.model, cfg.port, cfg.max_batch_size, cfg.host) == (
        "tiny", 0, 4, "0.0.0.0")
    assert cfg.system_prompt_file == tmp_path / "hidden.txt"
