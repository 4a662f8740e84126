"""Collection through a flaky server: every prompt ends up collected exactly once, retries are counted."""

from __future__ import annotations

import asyncio

import pytest
import torch

from proxykd_fast.teacher import CollectConfig, collect, load_failures, load_records
from proxykd_fast.teacher.client import RetryPolicy, TeacherClient
from proxykd_fast.teacher.faults import FaultConfig
from proxykd_fast.teacher.server import TeacherServer
from proxykd_fast.teacher.testing import write_prompts
from proxykd_fast.teacher.tiny import tiny_teacher

pytestmark = pytest.mark.timeout(120)

RATES = {"429": 0.07, "500": 0.05, "503": 0.05, "slow": 0.04, "drop": 0.06, "malformed": 0.05}
# How the collector names the failure each fault kind causes.
REASONS = {
    "429": "rate limited (429)",
    "500": "server error (500)",
    "503": "server error (503)",
    "slow": "timeout",
    "drop": "connection error",  # RemoteProtocolError or ReadError, depending on timing
    "malformed": "bad response: invalid JSON",
}


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_teacher(seed=2)
    torch.set_num_threads(threads)


def test_collection_survives_every_fault_kind(tiny, tmp_path):
    model, tok = tiny
    faults = FaultConfig(rates=RATES, seed=9, retry_after=0.3, slow_seconds=4.0)
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
    by_reason: dict[str, int] = {}
    for reason, count in summary.retry_reasons.items():
        kind = next(k for k, prefix in REASONS.items() if reason.startswith(prefix))
        by_reason[kind] = by_reason.get(kind, 0) + count
    assert by_reason == injected
    assert set(injected) == set(RATES)  # seed 9 draws every kind within the first 48 requests


def test_retry_after_is_honoured(tiny):
    model, tok = tiny
    faults = FaultConfig(rates={"429": 0.5}, seed=4, retry_after=0.4)  # 429 on the first draws
    with TeacherServer(model, tok, model_name="tiny", faults=faults) as srv:

        async def run():
            client = TeacherClient(srv.base_url, "tiny", policy=RetryPolicy(max_retries=20, backoff_base=0.01))
            delays: list[float] = []
            try:
                outcomes = await asyncio.gather(
                    *(
                        client.complete(
                            [{"role": "user", "content": f"q{i}"}], {"max_tokens": 2}, lambda r, d: delays.append(d)
                        )
                        for i in range(6)
                    )
                )
            finally:
                await client.close()
            return outcomes, delays

        outcomes, delays = asyncio.run(run())
    assert all(o.completion is not None for o in outcomes)
    assert delays and all(0.4 <= d <= 0.55 for d in delays)


def test_persistent_failures_are_recorded_not_fatal(tiny, tmp_path):
    model, tok = tiny
    faults = FaultConfig(rates={"500": 1.0}, seed=0)
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
    assert all(f["reason"] == "server error (500) after 3 attempts" and f["attempts"] == 3 for f in failures)
    assert all(f["retry_reasons"] == ["server error (500)"] * 2 for f in failures)
