"""Collection against the real local server: dataset output, resume bookkeeping and bad input."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pyarrow.parquet as pq
import pytest

from proxykd_fast.teacher import (
    CollectConfig,
    CollectError,
    collect,
    load_failures,
    load_records,
    to_dataset,
    to_parquet,
)
from proxykd_fast.teacher.cli import main as cli_main
from proxykd_fast.teacher.client import (
    BadResponse,
    Failure,
    RetryPolicy,
    TeacherClient,
    classify,
    parse_body,
    parse_retry_after,
)
from proxykd_fast.teacher.collect import housekeeping
from proxykd_fast.teacher.progress import ProgressBar, Stats
from proxykd_fast.teacher.prompts import prompt_hash, read_prompts
from proxykd_fast.teacher.records import strip_volatile
from proxykd_fast.teacher.server import TeacherServer
from proxykd_fast.teacher.store import FAILURES_FILE, RECORDS_FILE, JsonlAppender, OutputDir, StoreError
from proxykd_fast.teacher.testing import count_lines, make_prompts, write_prompts
from proxykd_fast.teacher.tiny import tiny_teacher
from tests.support.teacher import EngineGate, tiny_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    yield from tiny_server(seed=1)


def _config(server, tmp_path, n=36, **kw) -> CollectConfig:
    prompts = kw.pop("prompts", None) or write_prompts(tmp_path / "prompts.jsonl", n)
    base = dict(
        prompts=prompts,
        out=tmp_path / "out",
        base_url=server.base_url,
        model="tiny",
        max_tokens=8,
        temperature=0.0,
        concurrency=8,
        progress=False,
        timeout=20,
        backoff_base=0.05,
    )
    base.update(kw)
    return CollectConfig(**base)


def test_collect_to_dataset_and_parquet(server, tmp_path):
    cfg = _config(server, tmp_path, n=36, price_input_per_1k=0.5, price_output_per_1k=1.5)
    summary = collect(cfg)
    assert (summary.completed, summary.failed, summary.remaining, summary.retries) == (36, 0, 0, 0)
    records = load_records(cfg.out)
    assert len(records) == 36 and len({r["prompt_hash"] for r in records}) == 36
    for r in records:
        assert r["prompt"][-1]["role"] == "user"  # trailing reference answers were dropped
        assert r["completion"][0]["role"] == "assistant" and r["completion"][0]["content"]
        assert r["model"] == "tiny" and r["finish_reason"] in ("stop", "length")
        assert r["request_id"].startswith("req-") and r["attempts"] == 1
        assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
        assert r["prompt_hash"] == prompt_hash(r["prompt"], r["sample_index"])
    assert summary.prompt_tokens == sum(r["usage"]["prompt_tokens"] for r in records)
    assert summary.cost == pytest.approx((summary.prompt_tokens * 0.5 + summary.completion_tokens * 1.5) / 1000)
    ds = to_dataset(cfg.out)
    assert len(ds) == 36 and {"prompt", "completion", "prompt_hash", "usage"} <= set(ds.column_names)
    assert ds[0]["completion"][0]["role"] == "assistant"
    table = pq.read_table(to_parquet(cfg.out, tmp_path / "teacher.parquet"))
    assert table.num_rows == 36

    # A second run finds everything done and sends no completion request.
    served = server.handler.requests_ok
    again = collect(cfg)
    assert (again.already_done, again.completed) == (36, 0) and server.handler.requests_ok == served


def test_messages_format_n_per_prompt_and_seed(server, tmp_path):
    cfg = _config(server, tmp_path, n=6, format="messages", n_per_prompt=3, temperature=1.0, seed=7)
    summary = collect(cfg)
    assert summary.completed == 18 and summary.failed == 0
    records = load_records(cfg.out)
    assert sorted(r["sample_index"] for r in records) == sorted([0, 1, 2] * 6)
    for r in records:
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user"
    # Same seed + same sample index reproduce the same text; the 3 samples of a prompt differ.
    by_prompt: dict[str, list[str]] = {}
    for r in records:
        by_prompt.setdefault(json.dumps(r["messages"][:-1]), []).append(r["messages"][-1]["content"])
    assert all(len(v) == 3 for v in by_prompt.values())
    assert any(len(set(v)) > 1 for v in by_prompt.values())
    rerun = collect(
        _config(
            server,
            tmp_path,
            n=6,
            format="messages",
            n_per_prompt=3,
            temperature=1.0,
            seed=7,
            out=tmp_path / "out2",
            concurrency=2,
        )
    )
    assert rerun.completed == 18
    strip = lambda rows: sorted(json.dumps(strip_volatile(r), sort_keys=True) for r in rows)  # noqa: E731
    assert strip(load_records(tmp_path / "out2")) == strip(records)


def test_completions_mode(server, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"text number {i}"}) + "\n" for i in range(8)))
    cfg = _config(server, tmp_path, prompts=path, mode="completions")
    assert collect(cfg).completed == 8
    r = load_records(cfg.out)[0]
    assert isinstance(r["prompt"], str) and isinstance(r["completion"], str) and r["completion"]
    # Chat-shaped prompts cannot be sent to /completions: they are bad lines.
    pf = read_prompts(write_prompts(tmp_path / "c.jsonl", 3), "completions")
    assert [b.line_no for b in pf.bad_lines] == [2, 3]


def test_messages_format_needs_chat_mode(tmp_path, capsys):
    # Refused before the prompts file is read, the output dir created or any request sent.
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "text"}) + "\n")
    cfg = CollectConfig(prompts=path, out=tmp_path / "out", base_url="http://127.0.0.1:9/v1", model="tiny",
                        mode="completions", format="messages", progress=False)
    with pytest.raises(CollectError, match="--format messages needs --mode chat"):
        collect(cfg)
    argv = ["collect", "--prompts", str(path), "--out", str(tmp_path / "out"), "--base-url", "http://127.0.0.1:9/v1",
            "--model", "tiny", "--mode", "completions", "--format", "messages", "--no-progress"]
    assert cli_main(argv) == 2
    assert "prompt_completion" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_prompts_file(server, tmp_path, capsys):
    with pytest.raises(CollectError, match="prompts file not found"):
        collect(_config(server, tmp_path, prompts=tmp_path / "nope.jsonl"))
    argv = ["collect", "--prompts", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]
    rc = cli_main(argv + ["--base-url", server.base_url, "--model", "tiny", "--no-progress"])
    assert rc == 2 and "prompts file not found" in capsys.readouterr().err


def _bad_prompts(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"prompt": "good one"}),
        "{not json",
        json.dumps({"prompt": ""}),
        "",
        json.dumps({"text": "no prompt key"}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
        json.dumps([1, 2]),
        json.dumps({"messages": [{"role": "user", "content": "good two"}]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_lines_refused_with_line_numbers(server, tmp_path):
    with pytest.raises(CollectError) as info:
        collect(_config(server, tmp_path, prompts=_bad_prompts(tmp_path)))
    msg = str(info.value)
    for line_no in (2, 3, 5, 6, 7):
        assert f"bad.jsonl:{line_no}:" in msg
    assert "bad.jsonl:1:" not in msg and "bad.jsonl:8:" not in msg and "invalid JSON" in msg
    assert not (tmp_path / "out" / RECORDS_FILE).exists()  # nothing was sent


def test_bad_lines_skipped(server, tmp_path, caplog):
    summary = collect(_config(server, tmp_path, prompts=_bad_prompts(tmp_path), on_bad_line="skip"))
    assert (summary.prompts, summary.bad_lines, summary.completed) == (2, 5, 2)
    assert "bad.jsonl:6: message 0 has an invalid role" in caplog.text


def _bad_utf8_prompts(tmp_path):
    path = tmp_path / "enc.jsonl"
    lines = [
        b"\xef\xbb\xbf" + json.dumps({"prompt": "caf\u00e9 with a BOM"}, ensure_ascii=False).encode(),
        b'{"prompt": "caf\xe9 in latin-1"}',
        json.dumps({"prompt": "na\u00efve"}, ensure_ascii=False).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_utf8_is_a_bad_line_with_its_number(server, tmp_path):
    pf = read_prompts(_bad_utf8_prompts(tmp_path))
    assert [(b.line_no, b.reason) for b in pf.bad_lines] == [(2, "invalid UTF-8 (byte 0xe9 at column 16)")]
    assert [i.prompt[0]["content"] for i in pf.items] == ["caf\u00e9 with a BOM", "na\u00efve"]
    with pytest.raises(CollectError, match=r"enc\.jsonl:2: invalid UTF-8"):
        collect(_config(server, tmp_path, prompts=_bad_utf8_prompts(tmp_path)))
    summary = collect(_config(server, tmp_path, prompts=_bad_utf8_prompts(tmp_path), on_bad_line="skip"))
    assert (summary.prompts, summary.bad_lines, summary.completed) == (2, 1, 2)
    assert "\ufffd" not in json.dumps(load_records(tmp_path / "out"), ensure_ascii=False)


def test_unreachable_url_fails_clearly(tmp_path, capsys):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = CollectConfig(
        prompts=write_prompts(tmp_path / "p.jsonl", 3),
        out=tmp_path / "out",
        base_url=f"http://127.0.0.1:{port}/v1",
        model="m",
        max_retries=2,
        backoff_base=0.01,
        timeout=2,
        progress=False,
    )
    with pytest.raises(CollectError, match=r"cannot reach the teacher .* after 3 attempts"):
        collect(cfg)
    # Without the /models check, the first unit to use up its retries stops the run just as
    # clearly (nothing ever answered there), and no unit is logged as a failure.
    cfg.check_model = False
    cfg.concurrency = 2
    with pytest.raises(CollectError, match=r"cannot reach the teacher .* after 3 attempts .*not answered a single"):
        collect(cfg)
    assert load_failures(cfg.out) == [] and load_records(cfg.out) == []
    argv = ["collect", "--prompts", str(cfg.prompts), "--out", str(cfg.out), "--base-url", cfg.base_url]
    argv += ["--model", "m", "--no-model-check", "--max-retries", "1", "--backoff-base", "0.01", "--no-progress"]
    assert cli_main(argv) == 2
    assert "error: cannot reach the teacher" in capsys.readouterr().err


def test_wrong_model_name_fails_clearly(server, tmp_path):
    with pytest.raises(CollectError, match=r"model 'gpt-9' is not served at .*available: tiny"):
        collect(_config(server, tmp_path, model="gpt-9"))
    # Without the /models check the first request's 404 stops the run just as clearly.
    with pytest.raises(CollectError, match=r"not found \(404\).*gpt-9.*does not exist"):
        collect(_config(server, tmp_path, model="gpt-9", check_model=False))
    assert load_records(tmp_path / "out") == []


def test_truncated_last_line_is_repaired(server, tmp_path):
    cfg = _config(server, tmp_path, n=12)
    collect(cfg)
    path = tmp_path / "out" / RECORDS_FILE
    reference = {r["prompt_hash"]: strip_volatile(r) for r in load_records(cfg.out)}
    lines = path.read_bytes().splitlines(keepends=True)
    # Keep 8 full lines and half of the 9th, as a kill during a write would leave them.
    path.write_bytes(b"".join(lines[:8]) + lines[8][: len(lines[8]) // 2])
    summary = collect(cfg)
    assert summary.repaired_bytes == len(lines[8]) // 2
    assert (summary.already_done, summary.completed) == (8, 4)
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    rows = [json.loads(line) for line in raw.splitlines()]  # every line is valid JSON again
    assert len(rows) == 12 and {r["prompt_hash"]: strip_volatile(r) for r in rows} == reference


def test_changed_settings_refused_on_resume(server, tmp_path):
    collect(_config(server, tmp_path, n=3))
    with pytest.raises(CollectError, match="temperature"):
        collect(_config(server, tmp_path, n=3, temperature=0.7))
    assert collect(_config(server, tmp_path, n=3, temperature=0.7, allow_config_change=True)).already_done == 3


def test_output_dir_is_locked(tmp_path):
    first = OutputDir(tmp_path / "out")
    first.open({"model": "m"})
    try:
        with pytest.raises(StoreError, match="in use"):
            OutputDir(tmp_path / "out").open({"model": "m"})
    finally:
        first.close()


def test_prompt_hash_and_duplicates(server, tmp_path):
    assert prompt_hash("a", 0) != prompt_hash("a", 1)
    assert prompt_hash([{"role": "user", "content": "a"}]) == prompt_hash([{"content": "a", "role": "user"}])
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_prompts(4) + make_prompts(4)))
    summary = collect(_config(server, tmp_path, prompts=path))
    assert (summary.duplicates, summary.units_total, summary.completed) == (4, 4, 4)


def test_error_classification_and_retry_after():
    class Headers(dict):
        def get(self, key, default=None):
            return super().get(key.lower(), default)

    assert parse_retry_after(Headers({"retry-after": "3"})) == 3.0
    assert parse_retry_after(Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(Headers({})) is None
    assert classify(BadResponse("empty content"), "u", "m", "K") == Failure("retry", "bad response: empty content")
    for text, reason in [
        ("{", "invalid JSON"),
        ("[]", "not a JSON object"),
        ('{"choices": []}', "missing choices"),
        ('{"choices": [{"message": {"content": ""}}]}', "empty content"),
    ]:
        with pytest.raises(BadResponse, match=reason):
            parse_body(text, "chat")
    policy = RetryPolicy(backoff_base=1.0, backoff_max=5.0)
    rng = random.Random(0)
    delays = [policy.backoff(k, rng) for k in range(1, 6)]
    assert all(0.5 * min(5.0, 2 ** (k - 1)) <= d <= min(5.0, 2 ** (k - 1)) for k, d in zip(range(1, 6), delays))


def test_unknown_errors_are_classified():
    req = httpx.Request("POST", "http://teacher/v1/chat/completions")
    transient = openai.APIError("The upstream is overloaded, try again later", req, body=None)
    assert classify(transient, "u", "m", "K") == Failure("retry", "unexpected error (APIError)")
    odd = openai.APIResponseValidationError(httpx.Response(200, request=req), body=None)
    failure = classify(odd, "u", "m", "K")
    assert failure.kind == "permanent" and failure.reason.startswith("unexpected error (APIResponseValidationError: ")
    assert classify(ValueError("no"), "u", "m", "K") == Failure("permanent", "unexpected error (ValueError: no)")
    assert classify(RuntimeError("Connection reset by peer"), "u", "m", "K").kind == "retry"
    quota = openai.RateLimitError(
        "quota",
        response=httpx.Response(429, request=req),
        body={"code": "insufficient_quota", "message": "You exceeded your current quota"},
    )
    assert classify(quota, "u", "m", "K") == Failure(
        "fatal", "quota exhausted (429 insufficient_quota) at u: You exceeded your current quota"
    )


def test_unknown_api_errors_never_crash_the_run(server, tmp_path, monkeypatch):
    """Errors the client has no rule for are retried (transient-looking) or recorded, never raised.

    The openai package wraps every transport problem in its own types, so an unknown error
    cannot be provoked over the wire: it is raised above the HTTP layer, in `_attempt`,
    while all other requests go to the real server.
    """
    real_attempt = TeacherClient._attempt
    calls: Counter = Counter()

    async def attempt(self, prompt, params, key=None):
        text = prompt[-1]["content"]
        calls[text] += 1
        if text.startswith("q1: ") and calls[text] == 1:
            raise openai.APIError("upstream temporarily unavailable", httpx.Request("POST", self.base_url), body=None)
        if text.startswith("q2: "):
            raise openai.OpenAIError("content policy violation")
        return await real_attempt(self, prompt, params, key)

    monkeypatch.setattr(TeacherClient, "_attempt", attempt)
    summary = collect(_config(server, tmp_path, n=6))
    assert (summary.completed, summary.failed, summary.retries) == (5, 1, 1)
    assert summary.retry_reasons == {"unexpected error (APIError)": 1}
    (failure,) = load_failures(tmp_path / "out")
    assert failure["kind"] == "permanent" and failure["attempts"] == 1
    assert failure["reason"] == "unexpected error (OpenAIError: content policy violation)"
    monkeypatch.undo()
    assert collect(_config(server, tmp_path, n=6)).completed == 1  # the re-run retries the failed unit


def test_fatal_error_keeps_the_answers_in_flight(tmp_path):
    """A fatal stop sends nothing new but waits for the requests in flight and saves their answers."""
    model, tok = tiny_teacher(seed=1)
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "x" * 1100}] + [{"prompt": f"good question {i}"} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with TeacherServer(model, tok, model_name="tiny") as srv:
        cfg = _config(srv, tmp_path, prompts=path, concurrency=4, max_consecutive_failures=1)
        failures = cfg.out / FAILURES_FILE
        # The model holds the first batch until the too-long prompt's 400 has stopped the run
        # (the failure line is written in the same step that stops it).
        with EngineGate(srv.engine, hold=lambda rows: count_lines(failures) == 1):
            with pytest.raises(CollectError, match=r"stopping after 1 consecutive failed requests .*context length"):
                collect(cfg)
        assert srv.handler.requests_ok == 3  # the three requests in flight were answered, and no more sent
        assert len(load_records(cfg.out)) == 3 and len(load_failures(cfg.out)) == 1
        cfg.max_consecutive_failures = 0
        summary = collect(cfg)
        assert (summary.already_done, summary.completed, summary.failed) == (3, 3, 1)
        assert srv.handler.requests_ok == 6  # each answer was paid for once
    records = load_records(cfg.out)
    assert sorted(r["prompt"][0]["content"] for r in records) == [f"good question {i}" for i in range(6)]
    assert count_lines(cfg.out / RECORDS_FILE) == 6


class _Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fsync_is_also_time_based(tmp_path):
    clock = _Clock()
    appender = JsonlAppender(tmp_path / "a.jsonl", fsync_every=1000, fsync_interval=0.1, clock=clock)
    appender.write({"i": 0})
    assert (appender.pending, appender.sync_stale(), appender.syncs) == (1, False, 0)
    clock.now += 0.12
    assert appender.sync_stale() and (appender.pending, appender.syncs) == (0, 1)
    appender.write({"i": 1})
    clock.now += 0.12
    appender.write({"i": 2})  # the oldest unsynced line is old: this write syncs both
    assert (appender.pending, appender.syncs) == (0, 2)
    appender.close()
    for kwargs, name in [({"fsync_interval": 0}, "fsync_interval"), ({"fsync_every": 0}, "fsync_every")]:
        with pytest.raises(ValueError, match=name):
            JsonlAppender(tmp_path / "b.jsonl", **kwargs)
    with pytest.raises(CollectError, match="fsync_interval"):
        collect(
            CollectConfig(
                prompts=write_prompts(tmp_path / "p.jsonl", 1),
                out=tmp_path / "o",
                base_url="u",
                model="m",
                fsync_interval=-1.0,
            )
        )


def test_housekeeping_syncs_stale_lines_and_draws_the_bar(tmp_path):
    clock = _Clock()
    store = OutputDir(tmp_path / "out", fsync_every=1000, fsync_interval=0.1, clock=clock)
    store.open({"model": "m"})
    stats = Stats()
    bar = ProgressBar(stats, total=2, initial=0, enabled=False, clock=clock)

    async def run():
        store.records.write({"prompt_hash": "h"})
        stats.retry_started("timeout")
        bar.refresh()
        stats.retry_ended()
        bar.refresh()  # within 0.2 s of the last draw: deferred, the bar still shows 1
        assert bar.shown["retrying"] == 1
        ticker = asyncio.create_task(housekeeping(store, bar, 0.001))
        while bar.shown["retrying"] != 0:
            await asyncio.sleep(0.002)  # a tick draws the deferred change; the test timeout bounds this
        assert store.records.syncs == 0  # ... but the line is not yet fsync_interval old on the clock
        clock.now += 0.3
        while store.records.syncs == 0:
            await asyncio.sleep(0.002)  # the next tick syncs it
        ticker.cancel()

    try:
        asyncio.run(run())
        assert store.records.pending == 0 and store.records.syncs == 1
        assert bar.shown["retrying"] == 0 and bar.shown["retries"] == 1
    finally:
        bar.close()
        store.close()


def test_api_key_comes_from_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-test-123")
    captured = {}
    orig = openai.AsyncOpenAI.__init__

    def spy(self, *a, **kw):
        captured.update(kw)
        orig(self, *a, **kw)

    monkeypatch.setattr(openai.AsyncOpenAI, "__init__", spy)
    collect(_config(server, tmp_path, n=2, api_key_env="MY_TEACHER_KEY"))
    assert captured["api_key"] == "sk-test-123" and captured["max_retries"] == 0


def test_bad_api_key_fails_fast(tmp_path, monkeypatch):
    model, tok = tiny_teacher(seed=1)
    with TeacherServer(model, tok, model_name="tiny", api_key="sk-right") as srv:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        cfg = _config(srv, tmp_path, n=3)
        with pytest.raises(CollectError, match=r"authentication failed \(401\).*\$OPENAI_API_KEY"):
            collect(cfg)
        cfg.check_model = False  # the completion request itself gets 401 and is not retried
        with pytest.raises(CollectError, match=r"authentication failed \(401\)"):
            collect(cfg)
        assert load_records(cfg.out) == []
        monkeypatch.setenv("OPENAI_API_KEY", "sk-right")
        assert collect(cfg).completed == 3


def test_lone_surrogates_are_bad_lines(server, tmp_path, caplog):
    """Valid JSON that is not valid Unicode ("\\ud800") is a bad line with its number, not a crash."""
    path = tmp_path / "sur.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"prompt": "fine"}',
                '{"prompt": "half a pair \\ud800"}',
                '{"messages": [{"role": "user", "content": "x\\udfff"}]}',
                '{"id": "\\ud83d", "prompt": "good text, bad id"}',
                '{"prompt": "a real pair \\ud83d\\ude00"}',
            ]
        )
        + "\n",
        encoding="ascii",
    )
    pf = read_prompts(path)
    assert [(b.line_no, b.reason) for b in pf.bad_lines] == [
        (2, "the prompt holds a lone surrogate U+D800 (a \\u escape that is not valid Unicode)"),
        (3, "the prompt holds a lone surrogate U+DFFF (a \\u escape that is not valid Unicode)"),
        (4, '"id" holds a lone surrogate U+D83D (a \\u escape that is not valid Unicode)'),
    ]
    with pytest.raises(CollectError, match=r"sur\.jsonl:2: the prompt holds a lone surrogate"):
        collect(_config(server, tmp_path, prompts=path))
    summary = collect(_config(server, tmp_path, prompts=path, on_bad_line="skip"))
    assert (summary.prompts, summary.bad_lines, summary.completed, summary.remaining) == (2, 3, 2, 0)
    assert "sur.jsonl:4:" in caplog.text
    assert {r["prompt"][0]["content"] for r in load_records(tmp_path / "out")} == {"fine", "a real pair \U0001f600"}
    # An answer holding a lone surrogate could not be written either: it is a bad response.
    with pytest.raises(BadResponse, match="lone surrogate"):
        parse_body('{"choices": [{"message": {"content": "ok \\ud800"}}]}', "chat")


def test_null_and_mistyped_prompts_say_so(tmp_path):
    path = tmp_path / "null.jsonl"
    rows = [{"prompt": None}, {"prompt": 3}, {"messages": None}, {"prompt": {"role": "user"}}, {"prompt": []}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [b.reason for b in read_prompts(path).bad_lines] == [
        '"prompt" is null; expected a string or a list of messages',
        '"prompt" is a number; expected a string or a list of messages',
        '"messages" is null; expected a list of messages',
        '"prompt" is an object; expected a string or a list of messages',
        "messages must be a non-empty list",
    ]


class _WebPage(BaseHTTPRequestHandler):
    """Answers every request with 200 and an HTML page, as a web server or login proxy would."""

    requests: list[str] = []

    def _page(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b"<!DOCTYPE html><html><body>Welcome to nginx!</body></html>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _page

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def web_page():
    _WebPage.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _WebPage)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1", _WebPage.requests
    httpd.shutdown()
    httpd.server_close()


def test_a_web_page_is_not_an_api(web_page, tmp_path):
    url, requests = web_page
    cfg = CollectConfig(prompts=write_prompts(tmp_path / "p.jsonl", 5), out=tmp_path / "out", base_url=url,
                        model="m", concurrency=2, backoff_base=0.01, progress=False)
    with pytest.raises(CollectError, match=r"not an OpenAI-compatible API: it answered 200 with text/html"):
        collect(cfg)
    assert requests == ["GET /v1/models"]  # stopped at the model check: not one completion was tried
    # Without the model check the first answers stop the run just as clearly: no retries, no failures.
    cfg.check_model = False
    requests.clear()
    with pytest.raises(CollectError, match=r"not an OpenAI-compatible API.*Welcome to nginx"):
        collect(cfg)
    assert 1 <= len(requests) <= cfg.concurrency and load_failures(cfg.out) == []


def test_base_url_without_v1_suggests_it(server, tmp_path):
    root = server.base_url.removesuffix("/v1")
    with pytest.raises(CollectError, match=rf"{root}/models \(404\), but {root}/v1/models does: use --base-url "
                                           rf"{root}/v1$"):
        collect(_config(server, tmp_path, base_url=root))
    with pytest.raises(CollectError, match=rf"not found \(404\) at {root}: .*try --base-url {root}/v1"):
        collect(_config(server, tmp_path, base_url=root, check_model=False))
    assert load_records(tmp_path / "out") == []
    # A wrong model on the right URL still names the model.
    with pytest.raises(CollectError, match=r"not found \(404\).*for model 'gpt-9'"):
        collect(_config(server, tmp_path, model="gpt-9", check_model=False, out=tmp_path / "other"))


def test_collect_help_states_the_guarantees(capsys):
    with pytest.raises(SystemExit):
        cli_main(["collect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "exactly once" in text and "Idempotency-Key" in text
    assert "up to --concurrency requests per interruption" in text
