"""The local teacher server: OpenAI schema, batching determinism, errors, and each fault kind."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import openai
import pytest
import torch

from proxykd_fast.teacher.chat_format import FALLBACK_GENERATION_PROMPT, render_chat, with_system_prompt
from proxykd_fast.teacher.engine import GenerationEngine, GenRow
from proxykd_fast.teacher.faults import FAULT_KINDS, FaultConfig
from proxykd_fast.teacher.sampling import derive_seed
from proxykd_fast.teacher.server import TeacherServer
from proxykd_fast.teacher.tiny import tiny_teacher

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny():
    # One CPU thread is much faster for a tiny model on a small shared machine; restore it after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_teacher(seed=0)
    torch.set_num_threads(threads)


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
    # The context-length error does not reveal the hidden prompt either.
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, "x" * 1100, max_tokens=2)
    shown = len(render_chat(tok, [{"role": "user", "content": "x" * 1100}]))
    limit = server.handler.context_length - (len(full) - len(plain))
    assert f"the prompt has {shown} tokens; this model's context length is {limit}" in str(info.value)
    merged = with_system_prompt([{"role": "system", "content": "client"}, {"role": "user", "content": "q"}], "hidden")
    assert merged[0] == {"role": "system", "content": "hidden\n\nclient"} and len(merged) == 2


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
    before = server.engine.largest_batch
    with cf.ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda t: _ask(client, t, **kw), texts))
    assert concurrent == sequential
    assert max(before, server.engine.largest_batch) > 1


def test_abandoned_request_stops_generating(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1000, "temperature": 0}
    before = server.engine.rows_abandoned
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + "/chat/completions", json=body, timeout=0.2)
    deadline = time.monotonic() + 20
    while server.engine.rows_abandoned == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.engine.rows_abandoned == before + 1


@pytest.fixture(scope="module")
def fault_servers(tiny):
    model, tok = tiny
    servers = {}
    for kind in FAULT_KINDS:
        cfg = FaultConfig(rates={kind: 1.0}, seed=0, retry_after=2.5, slow_seconds=3.0)
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
