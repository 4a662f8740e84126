"""The `proxykd` console script wires the teacher and pipeline subcommands."""

from __future__ import annotations

import pytest

from proxykd_fast.cli import build_parser, main


def test_all_subcommands_present() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"collect", "serve-teacher", "align-proxy", "precompute", "distill", "eval"} <= set(sub.choices)


def test_clear_error_without_inputs(capsys: pytest.CaptureFixture[str], tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["distill", "--student", "/nonexistent/student", "--data", "x.jsonl", "--alpha", "0"]) == 2
    rc = main(["precompute", "--proxy", "", "--data", "/nonexistent.jsonl"])
    assert rc == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "proxykd_out").exists() and not (tmp_path / "proxykd_targets").exists()


def test_bad_config_values_are_a_clean_error(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("student: s\ndata: d.jsonl\nalpha: 0\nbatch_size: many\n")
    assert main(["distill", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "integer" in err and "Traceback" not in err
    cfg.write_text("student: [unclosed\n")
    assert main(["distill", "--config", str(cfg)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["align-proxy", "--proxy", "p", "--data", "d", "--dpo-loss-type", "kto"]) == 2
    assert "dpo_loss_type" in capsys.readouterr().err
