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
