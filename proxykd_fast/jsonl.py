"""JSON Lines: the one reader, appender and repair used for every JSONL file (records, metrics, prompts).

One rule for a torn line: a kill can leave only the *last* line without its newline. Such a line
is kept when it still parses as a JSON object (only the newline was lost), and otherwise dropped
with a warning: it is never an error and never hides a complete record. Any other line that is not
a JSON object is a bad line, which the caller either refuses (`on_bad_line="error"`, naming
file:line) or skips with a warning (`"skip"`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

log = logging.getLogger(__name__)

OnBadLine = Literal["error", "skip"]


class JsonlError(ValueError):
    """A line of a JSONL file that is not a JSON object, under `on_bad_line="error"`."""

    def __init__(self, path: Path, line_no: int, reason: str) -> None:
        super().__init__(f"{path}:{line_no}: {reason}")
        self.path, self.line_no, self.reason = path, line_no, reason


@dataclass(frozen=True)
class Line:
    """One non-blank line: its number, and the parsed object or why it is bad (`error`)."""

    line_no: int
    value: dict[str, Any] | None
    error: str | None = None


def parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(object, None) for a JSON object line, else (None, reason); bytes must be strict UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 (byte 0x{raw[exc.start : exc.start + 1].hex()} at column {exc.start + 1})"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(value, dict):
        return None, f"line is not a JSON object (got {type(value).__name__})"
    return value, None


def iter_lines(path: str | Path) -> Iterator[Line]:
    """Every non-blank line of `path` in order, parsed (a UTF-8 BOM on line 1 is dropped); a torn last line
    is dropped with a warning."""
    path = Path(path)
    with path.open("rb") as fh:
        line_no = 0
        for raw in fh:
            line_no += 1
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            value, error = parse_line(raw)
            if error is not None and not raw.endswith(b"\n"):
                log.warning("%s:%d: dropping a truncated last line (%d bytes without a newline: an interrupted "
                            "write)", path, line_no, len(raw))
                return
            yield Line(line_no, value, error)


def read_jsonl(path: str | Path, on_bad_line: OnBadLine = "error") -> Iterator[dict[str, Any]]:
    """The JSON objects of `path`, streamed; bad lines raise JsonlError or are skipped with a warning."""
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    path = Path(path)
    for line in iter_lines(path):
        if line.error is None:
            yield line.value  # type: ignore[misc]
        elif on_bad_line == "error":
            raise JsonlError(path, line.line_no, line.error)
        else:
            log.warning("%s:%d: skipping a bad line: %s", path, line.line_no, line.error)


def dumps_line(row: dict[str, Any]) -> str:
    """One compact JSON line (UTF-8 kept as is), newline included."""
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace `path` with `rows` atomically (temp file, fsync, rename): readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(dumps_line(row))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def repair_jsonl(path: str | Path) -> int:
    """Cut a partially written last line off `path` before appending to it; return how many bytes were dropped.

    A last line without its newline is cut whether or not it parses, so the next append starts on a
    fresh line (a complete last record is then rewritten by the caller's resume, never merged).
    """
    path = Path(path)
    if not path.exists():
        return 0
    with path.open("r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        pos, keep = size, 0  # scan backwards in blocks for the last newline
        while pos > 0:
            start = max(0, pos - 65536)
            fh.seek(start)
            idx = fh.read(pos - start).rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("repaired %s: dropped a truncated last line of %d bytes", path, size - keep)
    return size - keep


def check_fsync_settings(fsync_every: int, fsync_interval: float) -> None:
    """Raise ValueError naming the argument unless fsync_every >= 1 and fsync_interval > 0."""
    if isinstance(fsync_every, bool) or not isinstance(fsync_every, int) or fsync_every < 1:
        raise ValueError(f"fsync_every must be an integer >= 1, got {fsync_every!r}")
    if isinstance(fsync_interval, bool) or not isinstance(fsync_interval, (int, float)) or not fsync_interval > 0:
        raise ValueError(f"fsync_interval must be a number of seconds > 0, got {fsync_interval!r}")


class JsonlAppender:
    """Append JSON lines: each line reaches the OS at once (a kill -9 cannot lose it); an fsync follows every
    `fsync_every` lines, or once the oldest unsynced line is `fsync_interval` seconds old (see `sync_stale`)."""

    def __init__(self, path: str | Path, fsync_every: int = 8, fsync_interval: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        check_fsync_settings(fsync_every, fsync_interval)
        self.path = Path(path)
        self.fsync_every = fsync_every
        self.fsync_interval = float(fsync_interval)
        self.clock = clock  # monotonic seconds; injectable so tests move time without sleeping
        self._pending = 0
        self._oldest = 0.0  # monotonic time of the oldest unsynced line
        self.syncs = 0
        self._fh: TextIO = self.path.open("a", encoding="utf-8")

    @property
    def pending(self) -> int:
        """Lines written since the last fsync."""
        return self._pending

    def write(self, row: dict[str, Any]) -> None:
        """Write one row as a single line and flush it to the OS."""
        self._fh.write(dumps_line(row))
        self._fh.flush()
        now = self.clock()
        if not self._pending:
            self._oldest = now
        self._pending += 1
        if self._pending >= self.fsync_every or now - self._oldest >= self.fsync_interval:
            self.sync()

    def sync_stale(self) -> bool:
        """fsync if the oldest unsynced line is `fsync_interval` old; call it periodically. True if it synced."""
        if self._pending and self.clock() - self._oldest >= self.fsync_interval:
            self.sync()
            return True
        return False

    def sync(self) -> None:
        """Force written lines to disk (protects against power loss, not just process death)."""
        if self._pending:
            os.fsync(self._fh.fileno())
            self._pending = 0
            self.syncs += 1

    def close(self) -> None:
        """Sync and close the file."""
        if not self._fh.closed:
            self.sync()
            self._fh.close()


__all__ = [
    "JsonlAppender", "JsonlError", "Line", "OnBadLine", "check_fsync_settings", "dumps_line", "iter_lines",
    "parse_line", "read_jsonl", "repair_jsonl", "write_jsonl",
]
