"""Teacher records on disk: the collection output dir (lock, run settings, appenders), read-back, export.

Lines are written, repaired and read by `proxykd_fast.jsonl`, the one JSONL module.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from proxykd_fast.jsonl import JsonlAppender, check_fsync_settings, read_jsonl, repair_jsonl, write_jsonl

__all__ = ["FAILURES_FILE", "RECORDS_FILE", "JsonlAppender", "OutputDir", "StoreError", "check_fsync_settings",
           "iter_jsonl", "iter_records", "load_failures", "load_records", "repair_jsonl", "to_dataset", "to_parquet",
           "write_json_atomic"]

RECORDS_FILE = "records.jsonl"
FAILURES_FILE = "failures.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"


class StoreError(RuntimeError):
    """Raised when the output directory cannot be used (locked, or from an incompatible run)."""


def iter_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every JSON object line of `path` (none if it is missing); a bad line is logged and skipped, a line cut
    by a kill dropped (`proxykd_fast.jsonl`'s one rule)."""
    return list(read_jsonl(path, on_bad_line="skip")) if path.exists() else []


def iter_records(out_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The collected records of `out_dir` streamed in file order, the first one per prompt hash (a record
    without a hash, written by hand, is kept as is)."""
    path = Path(out_dir) / RECORDS_FILE
    if not path.exists():
        return
    seen: set[str] = set()
    for row in read_jsonl(path, on_bad_line="skip"):
        key = row.get("prompt_hash")
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        yield row


def load_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """Return the collected records of `out_dir`, one per prompt hash, in file order."""
    return list(iter_records(out_dir))


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


def write_json_atomic(path: Path, rows: list[dict[str, Any]] | dict[str, Any], jsonl: bool = False) -> None:
    """Replace `path` with `rows` (JSON, or JSON lines) so a kill leaves the old or the new file, never half."""
    if jsonl:
        write_jsonl(path, rows)  # type: ignore[arg-type]
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(rows, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
