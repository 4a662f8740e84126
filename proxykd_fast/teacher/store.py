"""Append-only JSONL storage for teacher records: crash-safe writes, repair, read-back, export."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
FAILURES_FILE = "failures.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"


class StoreError(RuntimeError):
    """Raised when the output directory cannot be used (locked, or from an incompatible run)."""


def repair_jsonl(path: Path) -> int:
    """Cut a partially written last line off `path`; return how many bytes were dropped."""
    if not path.exists():
        return 0
    with path.open("r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # Scan backwards in blocks for the last complete line.
        pos, keep = size, 0
        while pos > 0:
            start = max(0, pos - 65536)
            fh.seek(start)
            block = fh.read(pos - start)
            idx = block.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    dropped = size - keep
    log.warning("repaired %s: dropped a truncated last line of %d bytes", path, dropped)
    return dropped


def iter_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read every complete, valid JSON object line of `path` (invalid lines are logged and skipped)."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with path.open("r", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.endswith("\n"):
                log.warning("%s:%d: ignoring a truncated last line", path, line_no)
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: ignoring a corrupt line", path, line_no)
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def load_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """Return the collected records of `out_dir`, one per prompt hash, in file order."""
    seen: set[str] = set()
    rows = []
    for row in iter_jsonl(Path(out_dir) / RECORDS_FILE):
        key = row.get("prompt_hash")
        if key in seen:
            continue
        seen.add(key)
        rows.append(row)
    return rows


def load_failures(out_dir: str | Path) -> list[dict[str, Any]]:
    """Return every failure logged in `out_dir` (all runs, so a hash may repeat)."""
    return iter_jsonl(Path(out_dir) / FAILURES_FILE)


def to_dataset(out_dir: str | Path) -> Any:
    """Build a `datasets.Dataset` from the records of `out_dir` (TRL prompt/completion columns)."""
    import datasets

    return datasets.Dataset.from_list(load_records(out_dir))


def to_parquet(out_dir: str | Path, path: str | Path) -> Path:
    """Write the records of `out_dir` to a parquet file at `path` and return the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(load_records(out_dir)), path)
    return path


def check_fsync_settings(fsync_every: int, fsync_interval: float) -> None:
    """Raise ValueError naming the argument unless fsync_every >= 1 and fsync_interval > 0."""
    if isinstance(fsync_every, bool) or not isinstance(fsync_every, int) or fsync_every < 1:
        raise ValueError(f"fsync_every must be an integer >= 1, got {fsync_every!r}")
    if isinstance(fsync_interval, bool) or not isinstance(fsync_interval, (int, float)) or not fsync_interval > 0:
        raise ValueError(f"fsync_interval must be a number of seconds > 0, got {fsync_interval!r}")


def write_json_atomic(path: Path, rows: list[dict[str, Any]] | dict[str, Any], jsonl: bool = False) -> None:
    """Replace `path` with `rows` (JSON, or JSON lines) so a kill leaves the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    if jsonl:
        text = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)
    else:
        text = json.dumps(rows, indent=2, sort_keys=True) + "\n"
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class JsonlAppender:
    """Append JSON lines: each line reaches the OS at once; an fsync follows every `fsync_every`
    lines, or once the oldest unsynced line is `fsync_interval` seconds old (see `sync_stale`).

    `clock` (monotonic seconds) is injectable so tests can move time without sleeping.
    """

    def __init__(
        self,
        path: Path,
        fsync_every: int = 8,
        fsync_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_fsync_settings(fsync_every, fsync_interval)
        self.path = path
        self.fsync_every = fsync_every
        self.fsync_interval = float(fsync_interval)
        self.clock = clock
        self._pending = 0
        self._oldest = 0.0  # monotonic time of the oldest unsynced line
        self.syncs = 0
        self._fh: TextIO = path.open("a", encoding="utf-8")

    @property
    def pending(self) -> int:
        """Lines written since the last fsync."""
        return self._pending

    def write(self, row: dict[str, Any]) -> None:
        """Write one row as a single line; a kill -9 after this returns cannot lose it."""
        line = json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"
        self._fh.write(line)
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


class OutputDir:
    """The collection output directory: lock, repair on open, completed hashes, appenders.

    `run_id` is a random id made when the directory is first used and kept in run.json for
    good; idempotency keys include it, so two directories never share keys.
    """

    def __init__(
        self,
        path: str | Path,
        fsync_every: int = 8,
        fsync_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_fsync_settings(fsync_every, fsync_interval)
        self.path = Path(path)
        self.fsync_every = fsync_every
        self.fsync_interval = fsync_interval
        self.clock = clock
        self._lock_fh: TextIO | None = None
        self.records: JsonlAppender | None = None
        self.failures: JsonlAppender | None = None
        self.repaired_bytes = 0
        self.run_id = ""

    @property
    def records_path(self) -> Path:
        """Path of the records JSONL."""
        return self.path / RECORDS_FILE

    @property
    def failures_path(self) -> Path:
        """Path of the failures JSONL."""
        return self.path / FAILURES_FILE

    def open(self, run_info: dict[str, Any], allow_config_change: bool = False) -> set[str]:
        """Lock the directory, repair files, check run settings; return the completed hashes."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fh = (self.path / LOCK_FILE).open("w")
        try:
            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            self._lock_fh = None
            raise StoreError(f"{self.path} is in use by another collector") from None
        try:
            self._check_run_info(run_info, allow_config_change)
            self.repaired_bytes = repair_jsonl(self.records_path) + repair_jsonl(self.failures_path)
            done = {r["prompt_hash"] for r in iter_jsonl(self.records_path) if "prompt_hash" in r}
            self.records = self.appender(RECORDS_FILE)
            self.failures = self.appender(FAILURES_FILE)
        except BaseException:
            self.close()
            raise
        return done

    def appender(self, name: str) -> JsonlAppender:
        """An appender for file `name` of this directory, with its fsync settings and clock."""
        return JsonlAppender(self.path / name, self.fsync_every, self.fsync_interval, self.clock)

    def _check_run_info(self, run_info: dict[str, Any], allow_change: bool) -> None:
        """Refuse to mix records made with different generation settings in one directory."""
        run_path = self.path / RUN_FILE
        old = None
        if run_path.exists():
            try:
                old = json.loads(run_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = None
        if isinstance(old, dict) and isinstance(old.get("run_id"), str) and old["run_id"]:
            self.run_id = old["run_id"]
        else:
            self.run_id = secrets.token_hex(16)
        if isinstance(old, dict) and not allow_change:
            diff = {k: (old.get(k), v) for k, v in run_info.items() if old.get(k) != v}
            if diff:
                detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                raise StoreError(
                    f"{self.path} holds records from a run with other settings ({detail}); "
                    "use a new --out directory or allow the change explicitly"
                )
        write_json_atomic(run_path, {**run_info, "run_id": self.run_id})

    def sync_stale(self) -> None:
        """Time-based fsync of both appenders (cheap when nothing is pending)."""
        for appender in (self.records, self.failures):
            if appender is not None:
                appender.sync_stale()

    def close(self) -> None:
        """Sync and close the appenders and release the lock."""
        for appender in (self.records, self.failures):
            if appender is not None:
                appender.close()
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None
