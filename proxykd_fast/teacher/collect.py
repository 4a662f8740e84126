"""Collect teacher completions for a prompts file into a resumable, append-only JSONL dataset."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from proxykd_fast.options import option

from .client import FatalAPIError, Mode, RequestIdentity, RetryPolicy, TeacherClient
from .journal import InflightJournal
from .progress import ProgressBar, Stats
from .prompts import PromptsError, canonical_json, format_bad_lines, prompt_hash, read_prompts
from .records import RecordFormat, Unit, build_failure, build_record
from .store import OutputDir, StoreError

log = logging.getLogger(__name__)


class CollectError(RuntimeError):
    """A run that cannot start or must stop: bad input, locked output, auth, unknown model, no server."""


_R = RetryPolicy  # the retry defaults live there once


@dataclass
class CollectConfig:
    """Everything a collection run needs; `proxykd collect` parses its flags and `--config` YAML from these fields."""

    prompts: Path | str = option(help="JSONL with {'prompt': ...} or {'messages': [...]} per line (required)")
    out: Path | str = option(help="output directory (records.jsonl, failures.jsonl, run.json) (required)")
    base_url: str = option(help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (required)")
    model: str = option(help="teacher model name (required)")
    n_per_prompt: int = option(1, help="samples per prompt")
    concurrency: int = option(8, help="requests in flight")
    max_tokens: int | None = option(None, help="most tokens per answer (unset: the server's default)")
    temperature: float | None = option(None, help="sampling temperature (unset: the server's default)")
    top_p: float | None = option(None, help="nucleus top-p (unset: the server's default)")
    seed: int | None = option(None, help="base seed; sample k uses seed + k")
    api_key_env: str = option("OPENAI_API_KEY", help="environment variable holding the API key")
    timeout: float = option(_R.timeout, help="seconds per attempt")
    max_retries: int = option(_R.max_retries, help="retries per request")
    backoff_base: float = option(_R.backoff_base, help="first backoff in seconds (doubles each retry)")
    backoff_max: float = option(_R.backoff_max, help="longest backoff in seconds")
    max_retry_after: float = option(_R.max_retry_after, help="cap on a server's Retry-After, in seconds")
    mode: Mode = option("chat", help="chat (/v1/chat/completions) or completions (/v1/completions, string prompts)")
    on_bad_line: Literal["skip", "error"] = option("error", help="malformed prompt lines: refuse the run, or skip them")
    price_input_per_1k: float = option(0.0, help="price per 1k prompt tokens (for the cost estimate)")
    price_output_per_1k: float = option(0.0, help="price per 1k completion tokens (for the cost estimate)")
    format: RecordFormat = option("prompt_completion", help="record format: prompt_completion or messages (chat only)")
    progress: bool = option(True, help="show a progress bar")
    fsync_every: int = option(8, help="fsync records.jsonl every N lines")
    fsync_interval: float = option(2.0, help="... or once the oldest unsynced line is this many seconds old")
    check_model: bool = option(True, aliases=("model_check",), help="check /models for the teacher before starting")
    allow_config_change: bool = option(False, help="resume even if the sampling settings changed")
    max_consecutive_failures: int = option(50, help="stop after this many failures in a row (0: never)")
    idempotency_key: bool = option(True, help=(
        "send an Idempotency-Key header, so a server that honours it bills a resumed request once; "
        "--no-idempotency-key for a server or proxy that rejects it (an interrupted run may then be billed again "
        "for up to --concurrency requests)"))

    def retry_policy(self) -> RetryPolicy:
        """The client's retry policy from these settings."""
        return RetryPolicy(max_retries=self.max_retries, timeout=self.timeout, backoff_base=self.backoff_base,
                           backoff_max=self.backoff_max, max_retry_after=self.max_retry_after)

    def validate(self) -> None:
        """Refuse option combinations that would write misleading records (CollectError saying why)."""
        if self.format == "messages" and self.mode == "completions":
            raise CollectError(
                "--format messages needs --mode chat: in completions mode the teacher answers the raw prompt "
                "text with no chat template, but a messages record is a conversation that the pipeline (and "
                "TRL) would render with one; use --format prompt_completion, which keeps prompt and answer "
                "as plain text"
            )

    def run_info(self) -> dict[str, Any]:
        """Settings that change what the teacher answers; a resumed run must not change them."""
        return {
            "model": self.model,
            "mode": self.mode,
            "format": self.format,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }

    def request_params(self, sample_index: int) -> dict[str, Any]:
        """Per-request sampling parameters; the seed is offset by the sample index so samples differ."""
        params: dict[str, Any] = {}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if self.seed is not None:
            params["seed"] = self.seed + sample_index
        return params

    def identity_base(self, run_id: str, unit: Unit) -> str:
        """What an idempotency key names: this output dir's run, this unit, this exact request body."""
        body = canonical_json({"model": self.model, "mode": self.mode, "params": self.request_params(unit.sample_index)})
        return f"{run_id}:{unit.prompt_hash}:{hashlib.sha256(body.encode()).hexdigest()}"


@dataclass
class CollectSummary:
    """What a run did; `failed == 0` means every unit of the prompts file now has a record."""

    out_dir: str
    prompts: int = 0
    bad_lines: int = 0
    duplicates: int = 0
    units_total: int = 0
    already_done: int = 0
    completed: int = 0
    failed: int = 0
    retries: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)
    failure_reasons: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    elapsed_s: float = 0.0
    repaired_bytes: int = 0
    interrupted: int = 0

    @property
    def remaining(self) -> int:
        """Units still without a record after this run."""
        return self.units_total - self.already_done - self.completed

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON output."""
        return asdict(self)

    def format(self) -> str:
        """Human-readable multi-line summary."""
        rate = self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"collection summary for {self.out_dir}",
            f"  prompts: {self.prompts} (bad lines: {self.bad_lines}, duplicates: {self.duplicates})",
            f"  units: {self.units_total} total, {self.already_done} already done, "
            f"{self.completed} completed now, {self.failed} failed, {self.remaining} remaining",
            f"  retries: {self.retries}"
            + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.retry_reasons.items()))})" if self.retries else ""),
            f"  tokens: {self.prompt_tokens} prompt + {self.completion_tokens} completion, "
            f"estimated cost {self.cost:.4f}",
            f"  time: {self.elapsed_s:.2f} s ({rate:.2f} req/s)",
        ]
        if self.failure_reasons:
            lines.append("  failures: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.failure_reasons.items())))
        if self.repaired_bytes:
            lines.append(f"  repaired a truncated last line ({self.repaired_bytes} bytes dropped)")
        if self.interrupted:
            lines.append(
                f"  resumed: {self.interrupted} unit(s) were in flight when a previous run stopped and may have "
                "been billed; they were sent again with the same Idempotency-Key"
            )
        return "\n".join(lines)


def plan_units(config: CollectConfig, summary: CollectSummary) -> list[Unit]:
    """Read the prompts file and expand it into unique (prompt, sample) units."""
    if config.n_per_prompt < 1:
        raise CollectError("--n-per-prompt must be at least 1")
    try:
        pf = read_prompts(config.prompts, config.mode)
    except PromptsError as exc:
        raise CollectError(str(exc)) from None
    summary.bad_lines = len(pf.bad_lines)
    if pf.bad_lines:
        report = format_bad_lines(pf.path, pf.bad_lines)
        if config.on_bad_line == "error":
            raise CollectError(
                f"{len(pf.bad_lines)} malformed line(s) in the prompts file "
                f"(use --on-bad-line skip to skip them):\n{report}"
            )
        log.warning("skipping %d malformed line(s):\n%s", len(pf.bad_lines), report)
    summary.prompts = len(pf.items)
    units: list[Unit] = []
    seen: set[str] = set()
    for item in pf.items:
        for k in range(config.n_per_prompt):
            h = prompt_hash(item.prompt, k)
            if h in seen:
                summary.duplicates += k == 0
                continue
            seen.add(h)
            units.append(Unit(item.prompt, item.prompt_id, k, h, item.line_no))
    if not units:
        raise CollectError(f"no usable prompts in {config.prompts}")
    summary.units_total = len(units)
    return units


async def housekeeping(
    store: OutputDir, bar: ProgressBar, period: float, journal: InflightJournal | None = None
) -> None:
    """Every `period` seconds: fsync lines older than the fsync interval, draw changed counters."""
    while True:
        await asyncio.sleep(period)
        store.sync_stale()
        if journal is not None:
            journal.sync_stale()
        bar.flush()


async def _run(
    config: CollectConfig,
    units: Iterator[Unit],
    store: OutputDir,
    journal: InflightJournal,
    stats: Stats,
    bar: ProgressBar,
) -> None:
    """Drive `concurrency` workers over the pending units until done or a fatal error.

    A fatal error (auth, unknown model, unreachable server, too many failures in a row) stops
    handing out units and ends backoff sleeps, but lets requests already in flight finish (each
    within its timeout) and writes their answers, which were paid for; then it raises.
    """
    policy = config.retry_policy()
    client = TeacherClient(
        config.base_url,
        config.model,
        mode=config.mode,
        api_key_env=config.api_key_env,
        policy=policy,
        idempotency_key=config.idempotency_key,
    )
    consecutive_failures = 0
    stop = asyncio.Event()
    errors: list[str] = []

    def halt(reason: str) -> None:
        errors.append(reason)
        stop.set()

    def on_retry(reason: str, delay: float) -> None:
        stats.retry_started(reason)
        bar.refresh()

    def on_resume() -> None:
        stats.retry_ended()
        bar.refresh()

    async def worker() -> None:
        nonlocal consecutive_failures
        for unit in units:
            if stop.is_set():
                return  # the unit stays pending for the next run
            identity = RequestIdentity(
                config.identity_base(store.run_id, unit),
                generation=journal.generations.get(unit.prompt_hash, 0),
                on_send=lambda g, h=unit.prompt_hash: journal.sent(h, g),
            )
            outcome = await client.complete(
                unit.prompt, config.request_params(unit.sample_index), on_retry, on_resume, stop, identity
            )
            if outcome.completion is not None:
                record = build_record(
                    unit,
                    outcome.completion,
                    mode=config.mode,
                    fmt=config.format,
                    model=config.model,
                    attempts=outcome.attempts,
                    latency_s=outcome.latency_s,
                )
                store.records.write(record)
                consecutive_failures = 0
                stats.completed += 1
                stats.add_usage(outcome.completion.usage)
                bar.refresh(advance=1)
                continue
            failure = outcome.failure
            assert failure is not None
            if failure.kind == "stopped":
                return
            if failure.kind == "fatal":
                halt(failure.reason)
                return
            store.failures.write(build_failure(unit, failure, outcome.attempts, outcome.retry_reasons))
            journal.failed(unit.prompt_hash, identity.generation)
            stats.failed += 1
            stats.failure_reasons[failure.reason] += 1
            bar.refresh(advance=1)
            consecutive_failures += 1
            if config.max_consecutive_failures and consecutive_failures >= config.max_consecutive_failures:
                halt(
                    f"stopping after {consecutive_failures} consecutive failed requests "
                    f"(last: {failure.reason}); re-run to resume"
                )
                return

    tasks: list[asyncio.Task] = []
    ticker = asyncio.create_task(housekeeping(store, bar, min(0.5, config.fsync_interval / 2), journal))
    try:
        if config.check_model:
            await client.check_model()
        tasks = [asyncio.create_task(worker()) for _ in range(max(1, config.concurrency))]
        await asyncio.gather(*tasks)
    except FatalAPIError as exc:
        errors.append(str(exc))
    finally:
        # Workers still running here mean Ctrl-C, cancellation or a bug; only then is an answer in flight lost.
        for task in (*tasks, ticker):
            task.cancel()
        await asyncio.gather(*tasks, ticker, return_exceptions=True)
        await client.close()
    if errors:
        raise CollectError(errors[0])


def collect(config: CollectConfig) -> CollectSummary:
    """Collect every pending unit of `config.prompts` into `config.out`; safe to re-run after a kill."""
    return asyncio.run(acollect(config))


async def acollect(config: CollectConfig) -> CollectSummary:
    """`collect` for callers that already run an event loop."""
    start = time.monotonic()
    config.validate()
    summary = CollectSummary(out_dir=str(config.out))
    units = plan_units(config, summary)
    try:
        store = OutputDir(config.out, fsync_every=config.fsync_every, fsync_interval=config.fsync_interval)
    except ValueError as exc:
        raise CollectError(str(exc)) from None
    try:
        done = store.open(config.run_info(), allow_config_change=config.allow_config_change)
    except StoreError as exc:
        raise CollectError(str(exc)) from None
    journal = InflightJournal(store)
    try:
        journal.open(done)
        summary.repaired_bytes = store.repaired_bytes
        pending = [u for u in units if u.prompt_hash not in done]
        summary.already_done = len(units) - len(pending)
        summary.interrupted = sum(u.prompt_hash in journal.interrupted for u in pending)
        if summary.interrupted:
            log.warning(
                "%d unit(s) were in flight when a previous run stopped: the teacher may have billed them; "
                "they are sent again with the same Idempotency-Key (billed again unless the server honours it)",
                summary.interrupted,
            )
        stats = Stats(config.price_input_per_1k, config.price_output_per_1k)
        if pending:
            bar = ProgressBar(stats, total=len(units), initial=summary.already_done, enabled=config.progress)
            try:
                await _run(config, iter(pending), store, journal, stats, bar)
            finally:
                bar.close()
                _fill_summary(summary, stats)
    finally:
        journal.close()
        store.close()
        summary.elapsed_s = time.monotonic() - start
    return summary


def _fill_summary(summary: CollectSummary, stats: Stats) -> None:
    """Copy the live counters into the summary."""
    summary.completed = stats.completed
    summary.failed = stats.failed
    summary.retries = stats.retries
    summary.retry_reasons = dict(stats.retry_reasons)
    summary.failure_reasons = dict(stats.failure_reasons)
    summary.prompt_tokens = stats.prompt_tokens
    summary.completion_tokens = stats.completion_tokens
    summary.cost = stats.cost
