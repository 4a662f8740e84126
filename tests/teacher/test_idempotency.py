"""Idempotency-Key: the server computes a keyed request once; the client keeps a key until it is answered."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json

import httpx
import pytest

from proxykd_fast.teacher import CollectConfig, collect, load_records
from proxykd_fast.teacher.client import RequestIdentity, RetryPolicy, TeacherClient
from proxykd_fast.teacher.faults import FaultConfig
from proxykd_fast.teacher.idempotency import IdempotencyCache, KeyReused
from proxykd_fast.teacher.journal import INFLIGHT_FILE, InflightJournal
from proxykd_fast.teacher.server import TeacherServer
from proxykd_fast.teacher.store import OutputDir
from proxykd_fast.teacher.testing import write_prompts
from proxykd_fast.teacher.tiny import tiny_teacher
from tests.support.teacher import EngineGate, tiny_server, wait_until

pytestmark = pytest.mark.timeout(120)

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "tell me more"}], "max_tokens": 6,
        "temperature": 1.0}


@pytest.fixture(scope="module")
def server():
    yield from tiny_server(seed=5)


def _post(srv, body, key=None, timeout=30.0):
    headers = {"Idempotency-Key": key} if key else {}
    return httpx.post(srv.base_url + "/chat/completions", json=body, headers=headers, timeout=timeout)


def test_a_repeated_key_is_answered_once(server):
    before = server.handler.generations
    first = _post(server, BODY, "key-1")
    again = _post(server, BODY, "key-1")
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()  # the same answer, id included: nothing was generated again
    assert server.handler.generations == before + 1
    # Unseeded sampling: without a key the same body is a new generation with a new answer.
    other = _post(server, BODY)
    assert server.handler.generations == before + 2 and other.json()["id"] != first.json()["id"]
    # A key reused with another body is refused, as the IETF draft and Stripe do.
    r = _post(server, {**BODY, "max_tokens": 7}, "key-1")
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert _post(server, BODY, "k" * 256).status_code == 400


def test_a_failed_keyed_request_is_not_stored(server):
    bad = {**BODY, "temperature": 9}
    assert _post(server, bad, "key-bad").status_code == 400
    stored = len(server.handler.idempotency)
    assert _post(server, bad, "key-bad").status_code == 400  # computed (and refused) again, not replayed
    assert len(server.handler.idempotency) == stored


def test_a_repeat_while_running_joins_the_work(server):
    before = server.handler.generations
    with EngineGate(server.engine) as gate, cf.ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, server, BODY, "key-join")
        wait_until(lambda: gate.entered == 1, "the first request to reach the model")
        replays = server.handler.idempotency.replays
        second = pool.submit(_post, server, BODY, "key-join")
        wait_until(lambda: server.handler.idempotency.replays == replays + 1, "the repeat to join")
        gate.release()
        a, b = first.result(), second.result()
    assert a.json() == b.json() and server.handler.generations == before + 1


def test_keyed_work_survives_the_client_leaving(server):
    """A client killed or timed out mid-request comes back with the key and is not billed again."""
    before, ok = server.handler.generations, server.handler.requests_ok
    with EngineGate(server.engine) as gate:
        with pytest.raises(httpx.TimeoutException):
            _post(server, BODY, "key-gone", timeout=0.5)
        gate.release()
        wait_until(lambda: server.handler.requests_ok == ok + 1, "the abandoned request's answer")
    r = _post(server, BODY, "key-gone")
    assert r.status_code == 200 and server.handler.generations == before + 1


def test_cache_evicts_finished_answers_oldest_first():
    now = [0.0]

    async def run():
        cache = IdempotencyCache(max_entries=2, ttl_s=10.0, clock=lambda: now[0])
        calls = []

        async def compute(value):
            calls.append(value)
            return value

        for k in ("a", "b", "c"):
            assert await cache.start(k, "fp", lambda k=k: compute(k)) == k
        assert len(cache) == 2 and calls == ["a", "b", "c"]
        assert await cache.start("c", "fp", lambda: compute("c2")) == "c"  # kept: replayed
        assert await cache.start("a", "fp", lambda: compute("a2")) == "a2"  # evicted: computed again
        with pytest.raises(KeyReused):
            cache.start("a", "other body", lambda: compute("x"))
        now[0] = 11.0  # past the TTL
        assert await cache.start("a", "fp", lambda: compute("a3")) == "a3"
        hold = asyncio.Event()

        async def slow():
            await hold.wait()
            return "slow"

        running = cache.start("r", "fp", slow)
        for k in ("x", "y", "z"):
            await cache.start(k, "fp", lambda k=k: compute(k))
        assert cache.start("r", "fp", slow) is running  # work still running is never evicted
        hold.set()
        assert await running == "slow"

    asyncio.run(run())
    with pytest.raises(ValueError, match="max_entries"):
        IdempotencyCache(max_entries=0)


class _RecordKeys:
    """ASGI middleware that records the Idempotency-Key of every completion request."""

    def __init__(self, app):
        self.app, self.keys = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("/completions"):
            self.keys.append(dict(scope["headers"]).get(b"idempotency-key", b"").decode())
        await self.app(scope, receive, send)


@pytest.mark.parametrize("kind,same_key", [("drop", True), ("500", False), ("malformed", False)])
def test_the_key_changes_only_after_an_answer(kind, same_key):
    """No answer (a dropped connection): the server may still be working, so the key stays.
    Any answer (an error or an unusable body): the next attempt is a new request with a new key."""
    model, tok = tiny_teacher(seed=5)
    srv = TeacherServer(model, tok, model_name="tiny", faults=FaultConfig(rates={kind: 1.0}))
    recorder = srv.app = _RecordKeys(srv.app)
    sent: list[int] = []
    with srv:

        async def run():
            client = TeacherClient(srv.base_url, "tiny", policy=RetryPolicy(max_retries=2, backoff_base=0.01))
            identity = RequestIdentity("run:unit:body", on_send=sent.append)
            try:
                return await client.complete(BODY["messages"], {"max_tokens": 2}, identity=identity), identity
            finally:
                await client.close()

        outcome, identity = asyncio.run(run())
    assert outcome.completion is None and outcome.attempts == 3
    keys = recorder.keys
    assert len(keys) == 3 and all(k.startswith("proxykd-") for k in keys)
    assert (len(set(keys)) == 1) == same_key and (len(set(keys)) == 3) == (not same_key)
    assert sent == ([0, 0, 0] if same_key else [0, 1, 2])
    assert identity.generation == (0 if same_key else 3)


def test_collector_keys_are_stable_per_unit_and_distinct_per_directory(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    cfg = CollectConfig(prompts=prompts, out=tmp_path / "a", base_url="u", model="m", temperature=1.0)
    stores = []
    for out in ("a", "a", "b"):
        store = OutputDir(tmp_path / out)
        store.open(cfg.run_info())
        stores.append(store.run_id)
        store.close()
    assert stores[0] == stores[1] != stores[2] and len(stores[0]) == 32
    assert json.loads((tmp_path / "a" / "run.json").read_text())["run_id"] == stores[0]
    from proxykd_fast.teacher.collect import CollectSummary, plan_units

    unit = plan_units(cfg, CollectSummary(out_dir="a"))[0]
    base = cfg.identity_base(stores[0], unit)
    assert base == cfg.identity_base(stores[0], unit) != cfg.identity_base(stores[2], unit)
    changed = CollectConfig(prompts=prompts, out=tmp_path / "a", base_url="u", model="m", temperature=0.5)
    assert changed.identity_base(stores[0], unit) != base  # another request body: another key


def test_journal_knows_what_was_in_flight(tmp_path):
    store = OutputDir(tmp_path / "out")
    done = store.open({"model": "m"})
    journal = InflightJournal(store)
    journal.open(done)
    journal.sent("h-done", 0)
    journal.sent("h-flight", 0)
    journal.sent("h-flight", 0)  # a retry after a timeout: same generation
    journal.sent("h-failed", 0)
    journal.failed("h-failed", 1)
    journal.sent("h-retried", 0)
    journal.sent("h-retried", 1)
    store.records.write({"prompt_hash": "h-done"})
    (store.path / INFLIGHT_FILE).open("a").write('{"prompt_hash": "h-cut", "gen')  # a line cut by a kill
    journal.close()
    store.close()

    store = OutputDir(tmp_path / "out")
    done = store.open({"model": "m"})
    journal = InflightJournal(store)
    journal.open(done)
    assert journal.generations == {"h-flight": 0, "h-failed": 1, "h-retried": 1}
    assert journal.interrupted == {"h-flight", "h-retried"}
    rows = [json.loads(line) for line in (store.path / INFLIGHT_FILE).read_text().splitlines()]
    assert len(rows) == 3  # compacted: one line per pending unit, none for done ones
    journal.close()
    store.close()


def test_no_idempotency_key_option(server, tmp_path):
    recorder = _RecordKeys(None)
    model, tok = tiny_teacher(seed=5)
    srv = TeacherServer(model, tok, model_name="tiny")
    recorder.app, srv.app = srv.app, recorder
    with srv:
        for flag, out in ((True, "with"), (False, "without")):
            cfg = CollectConfig(prompts=write_prompts(tmp_path / "p.jsonl", 2), out=tmp_path / out,
                                base_url=srv.base_url, model="tiny", max_tokens=2, progress=False,
                                idempotency_key=flag)
            assert collect(cfg).completed == 2 and len(load_records(cfg.out)) == 2
    assert [bool(k) for k in recorder.keys] == [True, True, False, False]
