"""The one JSONL reader/appender: one rule for a torn last line, bad lines refused or skipped, atomic rewrite."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from proxykd_fast.jsonl import JsonlAppender, JsonlError, read_jsonl, repair_jsonl, write_jsonl

ROWS = [{"a": 1}, {"b": "é"}, {"c": [1, 2]}]


def _lines(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(_lines(ROWS) + '{"d": 12')  # a kill mid-write
    with caplog.at_level(logging.WARNING):
        for policy in ("error", "skip"):  # never an error, whatever the policy
            assert list(read_jsonl(path, on_bad_line=policy)) == ROWS
    assert "x.jsonl:4: dropping a truncated last line" in caplog.text


def test_a_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(_lines(ROWS) + '{"d": 12}')  # only the newline is missing (an editor, echo -n)
    assert list(read_jsonl(path)) == [*ROWS, {"d": 12}]


@pytest.mark.parametrize(("line", "reason"), [('{"broken": \n', "invalid JSON"), ("[1, 2]\n", "line is not a JSON object"),
                                              (b"\xff\xfe\n", "invalid UTF-8")])
def test_a_bad_middle_line_is_refused_or_skipped(tmp_path: Path, line: str | bytes, reason: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "x.jsonl"
    raw = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(_lines(ROWS[:1]).encode() + raw + _lines(ROWS[1:]).encode())
    with pytest.raises(JsonlError, match=f"x.jsonl:2: {reason}"):
        list(read_jsonl(path))
    with caplog.at_level(logging.WARNING):
        assert list(read_jsonl(path, on_bad_line="skip")) == ROWS
    assert "x.jsonl:2: skipping a bad line" in caplog.text


def test_blank_lines_are_ignored_and_the_policy_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text("\n" + _lines(ROWS[:1]) + "  \n" + _lines(ROWS[1:]))
    assert list(read_jsonl(path)) == ROWS
    with pytest.raises(ValueError, match="on_bad_line"):
        list(read_jsonl(path, on_bad_line="ignore"))  # type: ignore[arg-type]


def test_repair_then_append_never_merges_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(_lines(ROWS[:2]) + '{"c": [1,')
    assert repair_jsonl(path) == len('{"c": [1,')
    assert repair_jsonl(path) == 0
    out = JsonlAppender(path, fsync_every=2)
    out.write(ROWS[2])
    out.close()
    assert list(read_jsonl(path)) == ROWS


def test_write_jsonl_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(_lines(ROWS))
    write_jsonl(path, ROWS[:1])
    assert list(read_jsonl(path)) == ROWS[:1] and not list(tmp_path.glob(".*.tmp"))

