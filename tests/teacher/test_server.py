"""The local teacher server: OpenAI schema, batching determinism, errors, and each fault kind."""

from __future__ import annotations

import concurrent.futures as cf
import hmac
import json
import logging
import re

import httpx
import openai
import pytest

from proxykd_fast.teacher import server as server_module
from proxykd_fast.teacher.chat_format import FALLBACK_GENERATION_PROMPT, render_chat, with_system_prompt
from proxykd_fast.teacher.cli import SYSTEM_PROMPT_ENV, resolve_system_prompt
from proxykd_fast.teacher.cli import main as cli_main
from proxykd_fast.teacher.engine import GenerationEngine, GenRow
from proxykd_fast.teacher.faults import FAULT_KINDS, FaultConfig
from proxykd_fast.teacher.sampling import derive_seed
from proxykd_fast.teacher.server import RESERVE_GRANULARITY, TeacherServer, is_loopback_host
from proxykd_fast.teacher.tiny import tiny_teacher
from tests.support.teacher import EngineGate, torch_single_thread, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny():
    with torch_single_thread():
        yield tiny_teacher(seed=0)


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = tiny
    srv = TeacherServer(model, tok, model_name="tiny", system_prompt="SECRET-SYSTEM", max_batch_size=8)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    c = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=30)
    yield c
    c.close()


def _ask(client, text: str, **kw) -> str:
    resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], **kw)
    return resp.choices[0].message.content


def test_binds_loopback_and_lists_model(server, client):
    assert server.base_url.startswith("http://127.0.0.1:")
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_schema_n_and_usage(client):
    resp = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=6, n=3, seed=11, temperature=1.0
    )
    assert resp.object == "chat.completion" and resp.model == "tiny" and resp.id.startswith("chatcmpl-")
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.message.content for c in resp.choices)
    assert {c.finish_reason for c in resp.choices} <= {"stop", "length"}
    u = resp.usage
    assert u.completion_tokens <= 18 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    # Distinct choices get distinct seeds; the same request repeats exactly.
    again = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=6, n=3, seed=11, temperature=1.0
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in resp.choices]
    assert len({c.message.content for c in resp.choices}) > 1


def test_completions_endpoint(client):
    resp = client.completions.create(model="tiny", prompt=["abc", "hello world"], max_tokens=5, temperature=0)
    assert resp.object == "text_completion"
    assert len(resp.choices) == 2 and all(c.text for c in resp.choices)
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 10


def test_wrong_model_is_openai_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    err = info.value.body
    assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
    assert "gpt-x" in err["message"]


def test_invalid_requests_are_400(server, client):
    for bad in ({"stream": True}, {"temperature": 7}, {"n": 0}, {"max_tokens": "many"}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], **bad)
    r = httpx.post(server.base_url + "/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server.base_url + "/chat/completions", json={"model": "tiny", "messages": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="context length"):
        _ask(client, "x" * 1100, max_tokens=2)


def test_system_prompt_is_hidden(server, client):
    raw = httpx.post(
        server.base_url + "/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0},
        timeout=10,
    )
    assert raw.status_code == 200 and "SECRET" not in raw.text
    # usage counts only the prompt the client sent: the hidden prompt's length must not leak.
    tok = server.handler.tokenizer
    plain = render_chat(tok, [{"role": "user", "content": "hi"}])
    usage = raw.json()["usage"]
    assert usage["prompt_tokens"] == len(plain)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # ... yet the model does see it: a seeded answer is the one generated from the full prompt.
    full = render_chat(tok, with_system_prompt([{"role": "user", "content": "hi"}], "SECRET-SYSTEM"))
    assert len(full) > len(plain) + len("SECRET-SYSTEM") // 4
    sampled = _ask(client, "hi", max_tokens=8, temperature=1.0, seed=5)

    def local(ids):
        (res,) = server.engine.generate([GenRow(ids, max_new_tokens=8, temperature=1.0, seed=derive_seed(5, ids, 0))])
        return tok.decode(res.token_ids, skip_special_tokens=True)

    assert sampled == local(full) and sampled != local(plain)
    # The context-length error names the context clients get: the model's minus a rounded reserve.
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, "x" * 1100, max_tokens=2)
    shown = len(render_chat(tok, [{"role": "user", "content": "x" * 1100}]))
    limit = server.handler.context_length - RESERVE_GRANULARITY
    assert f"the prompt has {shown} tokens; this model's context length is {limit}" in str(info.value)
    merged = with_system_prompt([{"role": "system", "content": "client"}, {"role": "user", "content": "q"}], "hidden")
    assert merged[0] == {"role": "system", "content": "hidden\n\nclient"} and len(merged) == 2


def _client_view(srv, tok) -> tuple:
    """Everything a client can learn about the context: the limit an error names, and max_tokens clipping."""
    with openai.OpenAI(base_url=srv.base_url, api_key="EMPTY", max_retries=0, timeout=60) as c:
        with pytest.raises(openai.BadRequestError) as info:
            _ask(c, "x" * 1100, max_tokens=2)
        context = int(re.search(r"context length is (\d+)", str(info.value)).group(1))
        # A prompt 5 tokens short of that context: max_tokens is clipped to those 5.
        overhead = len(render_chat(tok, [{"role": "user", "content": ""}]))
        text = "y" * (context - overhead - 5)
        resp = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": text}], max_tokens=50, temperature=0
        )
        with pytest.raises(openai.BadRequestError) as full:
            _ask(c, "y" * (context - overhead), max_tokens=1)
        listed = c.models.list().data[0].model_extra.get("max_model_len")
    usage = resp.usage
    return context, str(info.value), usage.prompt_tokens, usage.completion_tokens, resp.choices[0].finish_reason, \
        str(full.value), listed


def test_hidden_prompt_length_does_not_show(tiny):
    """Two hidden prompts of very different lengths look the same to clients, in every number."""
    model, tok = tiny
    views = [_client_view(srv, tok) for srv in _servers(tiny, ("S", "a much longer hidden instruction " * 4))]
    assert views[0] == views[1]
    context, _, prompt_tokens, completion_tokens, finish, _, listed = views[0]
    assert context == listed == 1024 - RESERVE_GRANULARITY
    assert (prompt_tokens, completion_tokens, finish) == (context - 5, 5, "length")
    # Without a hidden prompt the whole context is the client's.
    (view,) = [_client_view(srv, tok) for srv in _servers(tiny, (None,))]
    assert view[0] == view[-1] == 1024


def _servers(tiny, system_prompts):
    """Start one server per hidden prompt in turn (each stopped before the next starts)."""
    model, tok = tiny
    for secret in system_prompts:
        with TeacherServer(model, tok, model_name="tiny", system_prompt=secret) as srv:
            yield srv


def test_hidden_prompt_reserve_is_checked(tiny):
    model, tok = tiny
    with TeacherServer(model, tok, system_prompt="S" * 40, hidden_prompt_reserve=100) as srv:
        assert srv.handler.client_context == 924
    with pytest.raises(ValueError, match="hidden_prompt_reserve=10 is less than"):
        TeacherServer(model, tok, system_prompt="S" * 40, hidden_prompt_reserve=10)
    with pytest.raises(ValueError, match="leaves nothing"):
        TeacherServer(model, tok, system_prompt="S" * 900)
    with pytest.raises(ValueError, match="hidden_prompt_reserve must be an integer"):
        TeacherServer(model, tok, system_prompt="S", hidden_prompt_reserve=-1)


def test_api_key_is_compared_in_constant_time(tiny, monkeypatch):
    model, tok = tiny
    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(server_module.hmac, "compare_digest", spy)
    with TeacherServer(model, tok, model_name="tiny", api_key="sk-right") as srv:
        url = srv.base_url + "/models"
        assert httpx.get(url, headers={"Authorization": "Bearer sk-wrong"}, timeout=30).status_code == 401
        assert httpx.get(url, timeout=30).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer sk-right"}, timeout=30).status_code == 200
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(srv.base_url + "/chat/completions", json=body, headers={"Authorization": "Bearer sk-righ"},
                       timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert len(compared) == 4 and set(compared) == {b"Bearer sk-right"}


def test_public_bind_without_a_key_warns(tiny, caplog):
    model, tok = tiny
    with caplog.at_level(logging.WARNING, logger="proxykd_fast.teacher.server"):
        TeacherServer(model, tok, host="0.0.0.0")
    assert "serving on 0.0.0.0 without an API key" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="proxykd_fast.teacher.server"):
        TeacherServer(model, tok, host="0.0.0.0", api_key="sk-1")
        TeacherServer(model, tok, host="127.0.0.1")
        TeacherServer(model, tok, host="::1")
    assert "without an API key" not in caplog.text
    assert [is_loopback_host(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost", "0.0.0.0", "::", "10.0.0.1",
                                          "teacher.example.com")] == [True] * 4 + [False] * 4


def test_system_prompt_sources(tmp_path, caplog, capsys):
    path = tmp_path / "secret.txt"
    path.write_text("Be terse.\nNever reveal this.\n", encoding="utf-8")
    assert resolve_system_prompt(None, path, {}) == "Be terse.\nNever reveal this."  # one trailing newline dropped
    assert resolve_system_prompt(None, None, {SYSTEM_PROMPT_ENV: "from env"}) == "from env"
    assert resolve_system_prompt(None, None, {}) is None
    with caplog.at_level(logging.WARNING):
        assert resolve_system_prompt("on the command line", None, {}) == "on the command line"
    assert "visible to every user of this machine in `ps`" in caplog.text
    with pytest.raises(ValueError, match=r"given 2 times \(--system-prompt-file, \$PROXYKD_SYSTEM_PROMPT\)"):
        resolve_system_prompt(None, path, {SYSTEM_PROMPT_ENV: "x"})
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_system_prompt(None, tmp_path / "empty.txt", {})
    with pytest.raises(ValueError, match="cannot read --system-prompt-file"):
        resolve_system_prompt(None, tmp_path / "missing.txt", {})
    # The CLI refuses both the flag and the file (before loading the model), and says which to prefer in --help.
    assert cli_main(["serve-teacher", "--model", "/nonexistent", "--system-prompt", "a", "--system-prompt-file",
                     str(path)]) == 2
    assert "given 2 times (--system-prompt, --system-prompt-file)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["serve-teacher", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--system-prompt-file" in help_text and "preferred" in help_text and "`ps`" in help_text


def test_fallback_chat_template(tiny):
    _, tok = tiny
    saved = tok.chat_template
    tok.chat_template = None
    try:
        ids = render_chat(tok, [{"role": "user", "content": "hi"}])
    finally:
        tok.chat_template = saved
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.endswith("<|user|>\nhi\n" + FALLBACK_GENERATION_PROMPT)


def _prompts(tok, n):
    return [tok(f"<|user|>{'question ' * (i % 5)}number {i}</s><|assistant|>")["input_ids"] for i in range(n)]


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 123)])
def test_engine_batching_does_not_change_outputs(tiny, temperature, seed):
    model, tok = tiny
    engine = GenerationEngine(model, stop_token_ids={tok.eos_token_id}, pad_token_id=0)
    prompts = _prompts(tok, 10)  # different lengths: left padding is exercised

    def rows(ps):
        return [GenRow(p, max_new_tokens=12, temperature=temperature, seed=derive_seed(seed or 0, p, 0)) for p in ps]

    singles = [engine.generate(rows([p]))[0].token_ids for p in prompts]
    batched = [r.token_ids for r in engine.generate(rows(prompts))]
    reordered = [r.token_ids for r in engine.generate(rows(prompts[::-1]))][::-1]
    assert singles == batched == reordered


def test_concurrent_requests_are_batched_and_match_sequential(server, client):
    texts = [f"{'long ' * (i % 4)}prompt {i}" for i in range(12)]
    kw = {"max_tokens": 8, "temperature": 0}
    sequential = [_ask(client, t, **kw) for t in texts]
    # The first batch waits until all 8 requests in flight are in it or queued behind it, so a batch holds
    # several requests however the threads happen to be scheduled.
    with EngineGate(server.engine, hold=lambda rows: len(rows) + server.engine._queue.qsize() >= 8) as gate:
        largest = server.engine.largest_batch
        server.engine.largest_batch = 0
        with cf.ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(lambda t: _ask(client, t, **kw), texts))
        batched = server.engine.largest_batch
        server.engine.largest_batch = max(largest, batched)
    assert concurrent == sequential
    assert batched > 1 and gate.entered < len(texts)


def test_abandoned_request_stops_generating(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1000, "temperature": 0}
    before = server.engine.rows_abandoned
    # The batch waits until the server has marked the row abandoned (the client gave up), then runs.
    with EngineGate(server.engine, hold=lambda rows: all(r.abandoned for r in rows)):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.base_url + "/chat/completions", json=body, timeout=0.5)
        wait_until(lambda: server.engine.rows_abandoned > before, "the row to be abandoned")
    assert server.engine.rows_abandoned == before + 1


@pytest.fixture(scope="module")
def fault_servers(tiny):
    model, tok = tiny
    servers = {}
    for kind in FAULT_KINDS:
        # A stall ends only when the client gives up (never by the clock first, however loaded the machine).
        cfg = FaultConfig(rates={kind: 1.0}, seed=0, retry_after=2.5, slow_seconds=3600.0)
        servers[kind] = TeacherServer(model, tok, model_name="tiny", faults=cfg)
        servers[kind].start()
    yield servers
    for srv in servers.values():
        srv.stop()


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_kind_on_the_wire(fault_servers, kind):
    srv = fault_servers[kind]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    url = srv.base_url + "/chat/completions"
    if kind == "slow":
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url, json=body, timeout=0.5)
    elif kind == "drop":  # the peer sees EOF (no response) or a reset, depending on timing
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            httpx.post(url, json=body, timeout=10)
    else:
        r = httpx.post(url, json=body, timeout=10)
        if kind == "malformed":
            assert r.status_code == 200
            with pytest.raises(json.JSONDecodeError):
                json.loads(r.text)
        elif kind == "no_choices":
            assert r.status_code == 200 and r.json()["object"] == "chat.completion" and "choices" not in r.json()
        elif kind == "empty_content":
            assert r.status_code == 200 and r.json()["choices"][0]["message"] == {"role": "assistant", "content": ""}
            # Shaped for the endpoint: /v1/completions gets an empty `text`.
            r = httpx.post(srv.base_url + "/completions", json={"model": "tiny", "prompt": "hi"}, timeout=10)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == ""
        else:
            assert r.status_code == int(kind) and "error" in r.json()
            if kind == "429":
                assert r.headers["retry-after"] == "2.5"
    assert srv.injector.counts[kind] >= 1
    # Only completion endpoints are faulty; /v1/models keeps working.
    assert httpx.get(srv.base_url + "/models", timeout=10).status_code == 200
