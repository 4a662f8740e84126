"""Collection through a flaky server: every prompt ends up collected exactly once, retries are counted.

Faults follow a per-request schedule (seed, request body, attempt number), so each test
below meets the same faults on every run, however the machine's load orders the requests:
the expected fault counts are computed from the schedule and asserted exactly.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from proxykd_fast.teacher import CollectConfig, collect, load_failures, load_records
from proxykd_fast.teacher.client import RetryPolicy, TeacherClient
from proxykd_fast.teacher.faults import FAULT_KINDS, FaultConfig, FaultInjector, request_fingerprint
from proxykd_fast.teacher.prompts import read_prompts
from proxykd_fast.teacher.server import TeacherServer
from proxykd_fast.teacher.testing import write_prompts
from proxykd_fast.teacher.tiny import tiny_teacher
from tests.support.teacher import chat_body, expected_faults, torch_single_thread

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
    with torch_single_thread():
        yield tiny_teacher(seed=2)


def _chat_bodies(prompts, params) -> list[bytes]:
    return [chat_body(item.prompt, "tiny", params) for item in read_prompts(prompts).items]


def test_fault_schedule_does_not_depend_on_arrival_order():
    """The n-th attempt of a request meets the same fault whatever else arrives, and in what order."""
    config = FaultConfig.uniform(0.6, seed=3)
    fingerprints = [request_fingerprint("/v1/chat/completions", f'{{"q": {i}}}'.encode()) for i in range(30)]
    arrivals = [fp for fp in fingerprints for _ in range(5)]  # five attempts of each request

    def per_request(order):
        injector = FaultInjector(config)
        seen: dict[str, list] = {fp: [] for fp in fingerprints}
        for fp in order:
            seen[fp].append(injector.draw(fp))
        return seen, injector.counts

    in_order, counts = per_request(arrivals)
    shuffled = arrivals[:]
    random.Random(0).shuffle(shuffled)  # another interleaving of the same attempts
    assert per_request(shuffled) == (in_order, counts)
    assert set(counts) == set(FAULT_KINDS) and sum(counts.values()) > 0
    # Each request's attempts are independent draws: some requests meet a fault first, then none.
    assert any(s[0] is not None and None in s for s in in_order.values())


def test_collection_survives_every_fault_kind(tiny, tmp_path):
    model, tok = tiny
    # A 'slow' fault stalls until the client's 10 s timeout: far above a normal answer's latency
    # on a loaded machine, so no answer times out unless the schedule says so.
    faults = FaultConfig(rates=RATES, seed=1, retry_after=0.3, slow_seconds=600.0)
    prompts = write_prompts(tmp_path / "p.jsonl", 48)
    expected = expected_faults(
        faults, "/v1/chat/completions", _chat_bodies(prompts, {"max_tokens": 8, "temperature": 0.0}), 13
    )
    assert set(expected) == set(RATES) and expected["slow"] == 1  # seed 1 schedules every kind, one stall
    with TeacherServer(model, tok, model_name="tiny", faults=faults) as srv:
        cfg = CollectConfig(
            prompts=prompts,
            out=tmp_path / "out",
            base_url=srv.base_url,
            model="tiny",
            max_tokens=8,
            temperature=0.0,
            concurrency=8,
            timeout=10.0,
            max_retries=12,
            backoff_base=0.05,
            backoff_max=0.5,
            progress=False,
        )
        summary = collect(cfg)
        injected = dict(srv.injector.counts)
        generations = srv.handler.generations
    records = load_records(cfg.out)
    assert (summary.completed, summary.failed, summary.remaining) == (48, 0, 0)
    assert len(records) == 48 and len({r["prompt_hash"] for r in records}) == 48
    assert load_failures(cfg.out) == []
    # Exactly the scheduled faults, each cost exactly one retry, and the counts agree everywhere.
    assert injected == dict(expected)
    assert summary.retries == sum(injected.values())
    assert summary.retries == sum(r["attempts"] - 1 for r in records)
    assert _by_kind(summary.retry_reasons) == injected
    assert generations == 48  # faults sit in front of the model: only served requests generate


BAD_RESPONSES = {"malformed": 0.2, "no_choices": 0.2, "empty_content": 0.2}


@pytest.mark.parametrize("mode", ["chat", "completions"])
def test_bad_responses_are_retried_until_each_prompt_is_done_once(tiny, tmp_path, mode):
    model, tok = tiny
    texts = [f"text number {i}" for i in range(12)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    faults = FaultConfig(rates=BAD_RESPONSES, seed=1)
    params = {"max_tokens": 4, "temperature": 0.0}
    if mode == "chat":
        path, bodies = "/v1/chat/completions", _chat_bodies(prompts, params)
    else:
        path = "/v1/completions"
        bodies = [json.dumps({"model": "tiny", "prompt": t, **params}).encode() for t in texts]
    # A fault rate of 0.6 with 12 retries: whether some prompt meets 13 bad answers in a row is
    # fixed by the schedule (it does not here), not by the order concurrent requests arrive in.
    expected = dict(expected_faults(faults, path, bodies, 13))
    assert set(expected) == set(BAD_RESPONSES)  # seed 1 schedules all three kinds
    with TeacherServer(model, tok, model_name="tiny", faults=faults) as srv:
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
    assert injected == expected
    records = load_records(cfg.out)
    assert (summary.completed, summary.failed, summary.remaining) == (12, 0, 0)
    assert sorted(r["prompt"] if mode == "completions" else r["prompt"][0]["content"] for r in records) == sorted(
        f"text number {i}" for i in range(12)
    )
    assert load_failures(cfg.out) == []
    assert _by_kind(summary.retry_reasons) == injected and summary.retries == sum(injected.values())


def test_retry_after_is_honoured(tiny):
    model, tok = tiny
    faults = FaultConfig(rates={"429": 0.5}, seed=4, retry_after=0.4)
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    expected = expected_faults(faults, "/v1/chat/completions", [chat_body(p, "tiny", {"max_tokens": 2}) for p in prompts], 21)
    assert expected["429"] > 0
    with TeacherServer(model, tok, model_name="tiny", faults=faults) as srv:

        async def run():
            client = TeacherClient(srv.base_url, "tiny", policy=RetryPolicy(max_retries=20, backoff_base=0.01))
            delays: list[float] = []
            waiting = [0]  # units sleeping now; it must be back at 0 once the sleeps end

            def on_retry(reason: str, delay: float) -> None:
                delays.append(delay)
                waiting[0] += 1

            def on_resume() -> None:
                waiting[0] -= 1

            try:
                outcomes = await asyncio.gather(
                    *(client.complete(p, {"max_tokens": 2}, on_retry, on_resume) for p in prompts)
                )
            finally:
                await client.close()
            return outcomes, delays, waiting[0]

        outcomes, delays, waiting = asyncio.run(run())
    assert all(o.completion is not None for o in outcomes)
    # One backoff per scheduled 429, each the server's Retry-After plus at most 0.1 s of jitter.
    assert len(delays) == expected["429"] and all(0.4 <= d <= 0.5 for d in delays)
    assert waiting == 0


def test_stop_ends_a_backoff_sleep_at_once(tiny):
    model, tok = tiny
    # An hour-long Retry-After (allowed by max_retry_after): if the stop did not end the sleep,
    # the test would hang into its timeout instead of returning.
    faults = FaultConfig(rates={"429": 1.0}, retry_after=3600.0)
    with TeacherServer(model, tok, model_name="tiny", faults=faults) as srv:

        async def run():
            client = TeacherClient(srv.base_url, "tiny", policy=RetryPolicy(max_retry_after=7200.0))
            stop = asyncio.Event()
            resumed: list[bool] = []
            delays: list[float] = []

            def on_retry(reason: str, delay: float) -> None:
                delays.append(delay)
                asyncio.get_running_loop().call_soon(stop.set)  # runs once the backoff sleep has begun

            try:
                outcome = await client.complete(
                    [{"role": "user", "content": "q"}], {}, on_retry, lambda: resumed.append(True), stop
                )
            finally:
                await client.close()
            return outcome, resumed, delays

        outcome, resumed, delays = asyncio.run(run())
    assert len(delays) == 1 and delays[0] >= 3600.0
    assert outcome.completion is None and outcome.failure.kind == "stopped"
    assert outcome.attempts == 1 and resumed == [True]
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
