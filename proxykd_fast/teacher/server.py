"""A local OpenAI-compatible teacher server over a Hugging Face causal LM (FastAPI + uvicorn)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from .chat_format import render_chat, stop_token_ids, with_system_prompt
from .engine import GenerationEngine, GenResult, GenRow
from .faults import FaultConfig, FaultInjector, FaultMiddleware
from .idempotency import MAX_KEY_LENGTH, IdempotencyCache, KeyReused
from .sampling import derive_seed

log = logging.getLogger(__name__)

MAX_N = 16
# The hidden system prompt's share of the context is rounded up to this many tokens, so the
# context length clients see tells them only a coarse bound on the hidden prompt's length.
RESERVE_GRANULARITY = 256
RESERVE_MARGIN = 8  # tokens of slack for tokenizers that merge across the hidden prompt's edge
_PROBES = (
    [{"role": "user", "content": "x"}],
    [{"role": "system", "content": "x"}, {"role": "user", "content": "x"}],
)


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def key_matches(authorization: bytes | None, api_key: str) -> bool:
    """Whether an Authorization header value is `Bearer <api_key>`, compared in constant time."""
    expected = b"Bearer " + api_key.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(authorization or b"", expected)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class RequestError(Exception):
    """An invalid request, turned into an OpenAI-style error response."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    """An OpenAI-style error body: {"error": {message, type, param, code}}."""
    type_ = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    """Read an optional number in [lo, hi] from the request body."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RequestError(400, f"'{key}' must be a number between {lo} and {hi}", param=key)
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    """Read an optional integer in [lo, hi] from the request body."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(400, f"'{key}' must be an integer between {lo} and {hi}", param=key)
    return value


def _stop_strings(body: dict[str, Any]) -> list[str]:
    """Read the optional `stop` parameter (a string or up to 4 strings)."""
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise RequestError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Truncate `text` at the earliest stop string; report whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class TeacherApp:
    """The request handling: validation, prompt rendering, engine submission, response building.

    The hidden system prompt must not be observable. `usage.prompt_tokens` counts the prompt as
    the client sent it, rendered as it would be without the hidden prompt, and the server acts
    as a model whose context is `client_context` = the model's context minus a fixed reserve
    for the hidden prompt (its token count plus a margin, rounded up to RESERVE_GRANULARITY,
    or `hidden_prompt_reserve` when given). The context-length error, the clipping of
    `max_tokens` (finish_reason "length") and /v1/models' `max_model_len` all use that number,
    so nothing a client sees depends on the hidden prompt's exact length.
    """

    def __init__(
        self,
        engine: GenerationEngine,
        tokenizer: Any,
        model_name: str,
        *,
        system_prompt: str | None = None,
        default_max_tokens: int = 256,
        context_length: int | None = None,
        api_key: str | None = None,
        hidden_prompt_reserve: int | None = None,
        idempotency: IdempotencyCache | None = None,
    ) -> None:
        self.engine = engine
        self.api_key = api_key
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.system_prompt = system_prompt
        self.default_max_tokens = default_max_tokens
        self.context_length = context_length
        self.idempotency = idempotency
        self.created = int(time.time())
        self.requests_ok = 0  # answers computed (a replayed answer is not counted again)
        self.generations = 0  # requests that reached the model: what a provider would bill
        self._warned_reserve = False
        self.hidden_tokens = self._hidden_overhead()
        self.reserve = self._reserve(hidden_prompt_reserve)
        self.client_context = None if context_length is None else context_length - self.reserve

    def _hidden_overhead(self) -> int:
        """How many tokens the hidden system prompt adds to a rendered chat (the most over probe shapes)."""
        if not self.system_prompt:
            return 0
        return max(
            len(render_chat(self.tokenizer, with_system_prompt(m, self.system_prompt)))
            - len(render_chat(self.tokenizer, with_system_prompt(m, None)))
            for m in _PROBES
        )

    def _reserve(self, reserve: int | None) -> int:
        """Tokens of the model's context set aside for the hidden prompt (ValueError if it cannot fit)."""
        if reserve is None:
            if not self.system_prompt:
                return 0
            need = self.hidden_tokens + RESERVE_MARGIN
            reserve = -(-need // RESERVE_GRANULARITY) * RESERVE_GRANULARITY
        elif isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise ValueError(f"hidden_prompt_reserve must be an integer >= 0, got {reserve!r}")
        elif reserve < self.hidden_tokens:
            raise ValueError(
                f"hidden_prompt_reserve={reserve} is less than the {self.hidden_tokens} tokens the hidden "
                "system prompt adds to a chat"
            )
        if self.context_length is not None and reserve >= self.context_length:
            raise ValueError(
                f"the hidden system prompt needs a reserve of {reserve} tokens, which leaves nothing of the "
                f"model's {self.context_length}-token context (shorten it or set a smaller reserve)"
            )
        return reserve

    def check_model(self, body: dict[str, Any]) -> None:
        """404 model_not_found unless the request names the served model."""
        model = body.get("model")
        if model != self.model_name:
            raise RequestError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                code="model_not_found",
                param="model",
            )

    def _sampling(self, body: dict[str, Any], default_max: int) -> dict[str, Any]:
        """Validate the shared sampling parameters."""
        if body.get("stream"):
            raise RequestError(400, "streaming is not supported by this server", param="stream")
        max_tokens = _integer(body, "max_completion_tokens", None, 1, 1 << 20)
        max_tokens = _integer(body, "max_tokens", max_tokens or default_max, 1, 1 << 20)
        return {
            "max_tokens": max_tokens,
            "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 1e-9, 1.0),
            "n": _integer(body, "n", 1, 1, MAX_N),
            "seed": _integer(body, "seed", None, -(2**63), 2**63 - 1),
            "stop": _stop_strings(body),
        }

    def _rows(self, prompt_ids: list[int], params: dict[str, Any], shown_tokens: int | None = None) -> list[GenRow]:
        """One engine row per requested choice, each with its own derived seed.

        `shown_tokens` is the prompt length the client may know (without the hidden system prompt);
        limits are checked against `client_context`, never against the model's own context.
        """
        if not prompt_ids:
            raise RequestError(400, "the prompt is empty", param="prompt")
        max_new = params["max_tokens"]
        if self.client_context is not None:
            shown = len(prompt_ids) if shown_tokens is None else shown_tokens
            room = self.client_context - shown
            real_room = self.context_length - len(prompt_ids)
            if real_room < room:  # the hidden prompt took more than its reserve here (a tokenizer quirk)
                if not self._warned_reserve:
                    self._warned_reserve = True
                    log.warning("the hidden system prompt took more than its %d-token reserve", self.reserve)
                room = real_room
            if room < 1:
                raise RequestError(
                    400,
                    f"the prompt has {shown} tokens; this model's context length is {self.client_context}",
                    code="context_length_exceeded",
                )
            max_new = min(max_new, room)
        return [
            GenRow(
                prompt_ids=prompt_ids,
                max_new_tokens=max_new,
                temperature=params["temperature"],
                top_p=params["top_p"],
                seed=derive_seed(params["seed"], prompt_ids, k),
            )
            for k in range(params["n"])
        ]

    async def _run(self, rows: list[GenRow], request: Request | None = None) -> list[GenResult]:
        """Submit rows to the engine and wait; if the client disconnects, abandon the rows."""
        self.generations += 1
        futures = [asyncio.wrap_future(self.engine.submit(r)) for r in rows]
        waiting = asyncio.ensure_future(asyncio.gather(*futures))
        try:
            return list(await wait_unless_gone(waiting, request))
        except BaseException:
            for row in rows:
                row.abandoned = True
            waiting.cancel()
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # consume the error
            raise

    def _text(self, result: GenResult, stops: list[str]) -> tuple[str, str]:
        """Decode a result and apply stop strings; return (text, finish_reason)."""
        text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, stops)
        return text, "stop" if stopped else result.finish_reason

    @staticmethod
    def _usage(prompt_tokens: int, results: list[GenResult]) -> dict[str, int]:
        """OpenAI usage block: prompt tokens counted once per prompt, completion tokens summed."""
        completion = sum(len(r.token_ids) for r in results)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    async def chat(self, body: dict[str, Any], request: Request | None = None) -> dict[str, Any]:
        """Handle /v1/chat/completions."""
        self.check_model(body)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        ):
            raise RequestError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
        params = self._sampling(body, self.default_max_tokens)
        prompt_ids = render_chat(self.tokenizer, with_system_prompt(messages, self.system_prompt))
        shown = self._shown_prompt_tokens(messages, prompt_ids)
        results = await self._run(self._rows(prompt_ids, params, shown), request)
        choices = []
        for k, result in enumerate(results):
            text, finish = self._text(result, params["stop"])
            choices.append(
                {
                    "index": k,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            )
        self.requests_ok += 1
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": self._usage(shown, results),
        }

    def _shown_prompt_tokens(self, messages: list[dict[str, Any]], prompt_ids: list[int]) -> int:
        """Prompt tokens to report: the client's messages rendered without the hidden system prompt."""
        if not self.system_prompt:
            return len(prompt_ids)
        return len(render_chat(self.tokenizer, with_system_prompt(messages, None)))

    async def completions(self, body: dict[str, Any], request: Request | None = None) -> dict[str, Any]:
        """Handle /v1/completions (a string prompt or a list of string prompts)."""
        self.check_model(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "'prompt' must be a string or a list of strings", param="prompt")
        params = self._sampling(body, 16)
        encoded = [list(self.tokenizer(p)["input_ids"]) for p in prompts]
        rows = [row for ids in encoded for row in self._rows(ids, params)]
        results = await self._run(rows, request)
        choices = []
        for k, result in enumerate(results):
            text, finish = self._text(result, params["stop"])
            choices.append({"index": k, "text": text, "logprobs": None, "finish_reason": finish})
        self.requests_ok += 1
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": self._usage(sum(len(ids) for ids in encoded), results),
        }

    def models(self) -> dict[str, Any]:
        """Handle /v1/models (`max_model_len` as vLLM reports it: the context clients may use)."""
        model: dict[str, Any] = {"id": self.model_name, "object": "model", "created": self.created}
        model["owned_by"] = "proxykd_fast"
        if self.client_context is not None:
            model["max_model_len"] = self.client_context
        return {"object": "list", "data": [model]}


async def wait_unless_gone(future: asyncio.Future, request: Request | None) -> Any:
    """Wait for `future`; raise ClientGone if the client disconnects first (`future` keeps running)."""
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.05)
        if done:
            return future.result()
        if request is not None and await request.is_disconnected():
            raise ClientGone()


def _header(request: Request, name: bytes) -> bytes | None:
    """The raw bytes of request header `name` (lower case), or None."""
    for key, value in request.scope.get("headers") or []:
        if key == name:
            return value
    return None


def create_app(handler: TeacherApp, injector: FaultInjector | None = None) -> Any:
    """Build the FastAPI app (wrapped in the fault middleware when `injector` is given)."""
    app = FastAPI(title="proxykd teacher", docs_url=None, redoc_url=None, openapi_url=None)

    def _check_key(request: Request) -> None:
        """401 unless `Authorization: Bearer <api_key>` matches (in constant time), when the server has a key."""
        key = handler.api_key
        if key and not key_matches(_header(request, b"authorization"), key):
            raise RequestError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise RequestError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    async def _compute(request: Request, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """Answer one request; with an Idempotency-Key (and a cache), at most once per key."""
        handle = handler.chat if kind == "chat" else handler.completions
        raw_key = _header(request, b"idempotency-key")
        if raw_key is None or handler.idempotency is None:
            return await handle(body, request)
        key = raw_key.decode("latin-1")
        if not key or len(key) > MAX_KEY_LENGTH:
            raise RequestError(400, f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters", param="idempotency-key")
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        fingerprint = hashlib.sha256(f"{kind}\0{canon}".encode()).hexdigest()
        try:
            future = handler.idempotency.start(key, fingerprint, lambda: handle(body, None))
        except KeyReused:
            raise RequestError(
                422, "this Idempotency-Key was used with a different request", code="idempotency_key_reused"
            ) from None
        return await wait_unless_gone(future, request)  # the work goes on if this client leaves

    async def _answer(request: Request, kind: str) -> JSONResponse:
        request_id = f"req-{uuid.uuid4().hex}"
        try:
            _check_key(request)
            body = await _json_body(request)
            payload = await _compute(request, kind, body)
        except (ClientGone, ClientDisconnect):
            resp = error_response(499, "client closed the request")
        except RequestError as exc:
            resp = error_response(exc.status, exc.message, exc.code, exc.param)
        except Exception as exc:  # report, never crash the server
            log.exception("request failed")
            resp = error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        else:
            resp = JSONResponse(payload)
        resp.headers["x-request-id"] = request_id
        return resp

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        return await _answer(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        return await _answer(request, "completions")

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        try:
            _check_key(request)
        except RequestError as exc:
            return error_response(exc.status, exc.message, exc.code)
        return JSONResponse(handler.models())

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        try:
            _check_key(request)
        except RequestError as exc:
            return error_response(exc.status, exc.message, exc.code)
        if model_id != handler.model_name:
            return error_response(404, f"The model '{model_id}' does not exist.", code="model_not_found")
        return JSONResponse(handler.models()["data"][0])

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    if injector is not None and injector.config.active:
        return FaultMiddleware(app, injector)
    return app


class TeacherServer:
    """Serve a model over HTTP; `start()` runs uvicorn in a background thread and returns the base URL."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str = "teacher",
        host: str = "127.0.0.1",
        port: int = 0,
        system_prompt: str | None = None,
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        default_max_tokens: int = 256,
        faults: FaultConfig | None = None,
        log_level: str = "warning",
        num_threads: int | None = None,
        api_key: str | None = None,
        hidden_prompt_reserve: int | None = None,
        idempotency_cache: int = 4096,
    ) -> None:
        if not api_key and not is_loopback_host(host):
            log.warning(
                "serving on %s without an API key: anyone who can reach this address can use the model "
                "(and its hidden system prompt); set --api-key-env, or bind 127.0.0.1",
                host,
            )
        if isinstance(idempotency_cache, bool) or not isinstance(idempotency_cache, int) or idempotency_cache < 0:
            raise ValueError(f"idempotency_cache must be an integer >= 0 (0: ignore keys), got {idempotency_cache!r}")
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.engine = GenerationEngine(
            model,
            stop_token_ids=set(stop_token_ids(tokenizer, model)),
            pad_token_id=int(pad),
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
            num_threads=num_threads,
        )
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.handler = TeacherApp(
            self.engine,
            tokenizer,
            model_name,
            system_prompt=system_prompt,
            default_max_tokens=default_max_tokens,
            context_length=context,
            api_key=api_key,
            hidden_prompt_reserve=hidden_prompt_reserve,
            idempotency=IdempotencyCache(idempotency_cache) if idempotency_cache else None,
        )
        self.injector = FaultInjector(faults) if faults is not None else None
        self.app = create_app(self.handler, self.injector)
        self.host, self.port = host, port
        self.log_level = log_level
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL clients should use (ends in /v1)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def _bind(self) -> socket.socket:
        """Bind the listening socket ourselves so port 0 picks a free port without races."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        return sock

    def _make_server(self) -> Any:
        import uvicorn

        config = uvicorn.Config(
            self.app,
            log_level=self.log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            # Longer than uvicorn's 5 s, so a client's pooled connection is not closed under it
            # while it waits out a slow request or a backoff.
            timeout_keep_alive=65,
        )
        return uvicorn.Server(config)

    def start(self, timeout: float = 30.0) -> str:
        """Start serving in a daemon thread; return the base URL once the server accepts requests."""
        if self._thread is not None:
            return self.base_url
        sock = self._bind()
        self.engine.start()
        self._server = self._make_server()
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="teacher-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"teacher server failed to start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self.base_url

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (Ctrl-C / SIGTERM)."""
        sock = self._bind()
        print(f"serving {self.handler.model_name!r} at {self.base_url}", file=sys.stderr, flush=True)
        self.engine.start()
        self._server = self._make_server()
        try:
            self._server.run(sockets=[sock])
        finally:
            self.engine.stop()

    def stop(self) -> None:
        """Stop the HTTP server and the generation worker."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.engine.stop()

    def __enter__(self) -> TeacherServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
