"""Collection through a flaky server: every prompt ends up collected exactly once, retries are counted."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from proxykd_fast.teacher import CollectConfig, collect, load_failures, load_records
from proxykd_fast.teacher.client import RetryPolicy, TeacherClient
from proxykd_fast.teacher.faults import FaultConfig
from proxykd_fast.teacher.server import TeacherServer
from proxykd_fast.teacher.testing import write_prompts
from proxykd_fast.teacher.tiny import tiny_teacher

pytestmark = pytest.mark.timeout(120)

RATES = {
    "429": 0.06,
    "500": 0.04,
    "503": 0.04,
    "slow": 0.04,
    "drop": 0.05,
    "malformed": 0.04,
    "no_choices": 0.04,
    "empty_content": 0.04,
}
# How the collector names the failure each fault kind causes.
REASONS = {
    "429": "rate limited (429)",
    "500": "server error (500)",
    "503": "server error (503)",
    "slow": "timeout",
    "drop": "connection error",  # RemoteProtocolError or ReadError, depending on timing
    "malformed": "bad response: invalid JSON",
    "no_choices": "bad response: missing choices",
    "empty_content": "bad response: empty content",
}


def _by_kind(retry_reasons: dict[str, int]) -> dict[str, int]:
    """Sum the collector's retry counts per fault kind, by reason prefix."""
    out: dict[str, int] = {}
    for reason, count in retry_reasons.items():
        kind = next(k for k, prefix in REASONS.items() if reason.startswith(prefix))
        out[kind] = out.get(kind, 0) + count
    return out


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_teacher(seed=2)
    torch.set_num_threads(threads)


def test_collection_survives_every_fault_kind(tiny, tmp_path):
    model, tok = tiny
    faults = FaultConfig(rates=RATES, seed=2, retry_after=0.3, slow_seconds=4.0)
    with TeacherServer(model, tok, model_name="tiny", faults=faults) as srv:
        cfg = CollectConfig(
            prompts=write_prompts(tmp_path / "p.jsonl", 48),
            out=tmp_path / "out",
            base_url=srv.base_url,
            model="tiny",
            max_tokens=8,
            temperature=0.0,
            concurrency=8,
            timeout=2.5,
            max_retries=12,
            backoff_base=0.05,
            backoff_max=0.5,
            progress=False,
        )
        summary = collect(cfg)
        injected = dict(srv.injector.counts)
    records = load_records(cfg.out)
    assert (summary.completed, summary.failed, summary.remaining) == (48, 0, 0)
    assert len(records) == 48 and len({r["prompt_hash"] for r in records}) == 48
    assert load_failures(cfg.out) == []
    # Every injected fault cost exactly one retry, and the counts agree everywhere.
    assert summary.retries > 0 and summary.retries == sum(injected.values())
    assert summary.retries == sum(r["attempts"] - 1 for r in records)
    assert _by_kind(summary.retry_reasons) == injected
    assert set(injected) == set(RATES)  # seed 2 draws every kind within the first 40 requests


BAD_RESPONSES = {"malformed": 0.2, "no_choices": 0.2, "empty_content": 0.2}


@pytest.mark.parametrize("mode", ["chat", "completions"])
def test_bad_responses_are_retried_until_each_prompt_is_done_once(tiny, tmp_path, mode):
    model, tok = tiny
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"text number {i}"}) + "\n" for i in range(12)))
    with TeacherServer(model, tok, model_name="tiny", faults=FaultConfig(rates=BAD_RESPONSES, seed=1)) as srv:
        cfg = CollectConfig(
            prompts=prompts,
            out=tmp_path / "out",
            base_url=srv.base_url,
            model="tiny",
            mode=mode,
            max_tokens=4,
            temperature=0.0,
            concurrency=4,
            max_retries=12,
            backoff_base=0.01,
            backoff_max=0.05,
            progress=False,
        )
        summary = collect(cfg)
        injected = dict(srv.injector.counts)
    assert set(injected) == set(BAD_RESPONSES)  # seed 1 draws all three kinds
    records = load_records(cfg.out)
    assert (summary.completed, summary.failed, summary.remaining) == (12, 0, 0)
    assert sorted(r["prompt"] if mode == "completions" else r["prompt"][0]["content"] for r in records) == sorted(
        f"text number {i}" for i in range(12)
    )
    assert load_failures(cfg.out) == []
    assert _by_kind(summary.retry_reasons) == injected and summary.retries == sum(injected.values())


def test_retry_after_is_honoured(tiny):
    model, tok = tiny
    faults = FaultConfig(rates={"429": 0.5}, seed=4, retry_after=0.4)  # 429 on the first draws
    with TeacherServer(model, tok, model_name="tiny", faults=faults) as srv:

        async def run():
            client = TeacherClient(srv.base_url, "tiny", policy=RetryPolicy(max_retries=20, backoff_base=0.01))
            delays: list[float] = []
            waiting = [0]  # units sleeping now; it must be back at 0 as soon as the sleeps end
            seen: list[int] = []

            def on_retry(reason: str, delay: float) -> None:
                delays.append(delay)
                waiting[0] += 1
                seen.append(waiting[0])

            def on_resume() -> None:
                waiting[0] -= 1

            try:
                outcomes = await asyncio.gather(
                    *(
                        client.complete([{"role": "user", "content": f"q{i}"}], {"max_tokens": 2}, on_retry, on_resume)
                        for i in range(6)
                    )
                )
            finally:
                await client.close()
            return outcomes, delays, waiting[0], seen

        outcomes, delays, waiting, seen = asyncio.run(run())
    assert all(o.completion is not None for o in outcomes)
    assert delays and all(0.4 <= d <= 0.55 for d in delays)
    assert waiting == 0 and max(seen) > 1  # several slept at once, and every sleep was ended


def test_stop_ends_a_backoff_sleep_at_once(tiny):
    model, tok = tiny
    faults = FaultConfig(rates={"429": 1.0}, retry_after=30.0)
    with TeacherServer(model, tok, model_name="tiny", faults=faults) as srv:

        async def run():
            client = TeacherClient(srv.base_url, "tiny")
            stop = asyncio.Event()
            resumed: list[bool] = []
            asyncio.get_running_loop().call_later(0.3, stop.set)
            start = time.monotonic()
            try:
                outcome = await client.complete(
                    [{"role": "user", "content": "q"}], {}, None, lambda: resumed.append(True), stop
                )
            finally:
                await client.close()
            return outcome, time.monotonic() - start, resumed

        outcome, elapsed, resumed = asyncio.run(run())
    assert outcome.completion is None and outcome.failure.kind == "stopped"
    assert outcome.attempts == 1 and resumed == [True] and elapsed < 3.0
    assert srv.injector.requests == 1  # no attempt was made after the stop


@pytest.mark.parametrize("kind", ["500", "no_choices", "empty_content"])
def test_persistent_failures_are_recorded_not_fatal(tiny, tmp_path, kind):
    model, tok = tiny
    faults = FaultConfig(rates={kind: 1.0}, seed=0)
    with TeacherServer(model, tok, model_name="tiny", faults=faults) as srv:
        cfg = CollectConfig(
            prompts=write_prompts(tmp_path / "p.jsonl", 4),
            out=tmp_path / "out",
            base_url=srv.base_url,
            model="tiny",
            max_retries=2,
            backoff_base=0.01,
            progress=False,
        )
        summary = collect(cfg)
    assert (summary.completed, summary.failed, summary.retries) == (0, 4, 8)
    failures = load_failures(cfg.out)
    assert len(failures) == 4
    reason = {"500": "server error (500)"}.get(kind, REASONS[kind])
    assert all(f["reason"] == f"{reason} after 3 attempts" and f["attempts"] == 3 for f in failures)
    assert all(f["retry_reasons"] == [reason] * 2 for f in failures)
