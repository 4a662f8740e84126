"""Fault injection for the local teacher server, to prove the collector survives a flaky API.

An ASGI middleware in front of the completion endpoints may answer 429 (with Retry-After),
500 or 503, stall until the client times out (or `slow_seconds` pass), drop the connection
mid-response, or answer 200 with a body the client cannot use: malformed JSON, no `choices`,
or empty content.

Which fault (if any) a request gets is a pure function of the seed, the request (endpoint and
body) and how many times that same request has arrived before: the n-th attempt of a given
request always meets the same fault, however many requests run concurrently and in whatever
order they arrive. (Requests with identical bodies, e.g. several unseeded samples of one
prompt, share one schedule; the Idempotency-Key is left out because it holds a random run id.) Counts of injected faults are kept so tests can check them
against the collector's retry counters.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .asgi import App, Receive, Scope, Send, read_body, replay_body

# New kinds go at the end: the draw walks this order, so seeded runs keep their old faults.
FAULT_KINDS = ("429", "500", "503", "slow", "drop", "malformed", "no_choices", "empty_content")
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class FaultConfig:
    """Per-kind fault probabilities (summing to at most 1) and how each fault behaves."""

    rates: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    retry_after: float = 1.0
    slow_seconds: float = 5.0
    latency: float = 0.0
    paths: tuple[str, ...] = COMPLETION_PATHS

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        if any(r < 0 for r in self.rates.values()) or sum(self.rates.values()) > 1.0 + 1e-9:
            raise ValueError("fault rates must be >= 0 and sum to at most 1")

    @classmethod
    def uniform(cls, rate: float, kinds: tuple[str, ...] | list[str] = FAULT_KINDS, **kwargs: Any) -> FaultConfig:
        """Spread a total fault `rate` evenly over `kinds`."""
        kinds = tuple(kinds)
        return cls(rates={k: rate / len(kinds) for k in kinds} if kinds else {}, **kwargs)

    @property
    def active(self) -> bool:
        """True when any fault or added latency is configured."""
        return self.latency > 0 or any(r > 0 for r in self.rates.values())


class InjectedDrop(Exception):
    """Raised mid-response on purpose so the server closes the connection without finishing."""


class _HideInjectedDrops(logging.Filter):
    """Keep the server log free of tracebacks for connections we dropped on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, InjectedDrop)


def request_fingerprint(path: str, body: bytes) -> str:
    """What identifies "the same request" across attempts: the endpoint and the body (canonical JSON)."""
    try:
        canon = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, UnicodeDecodeError):
        canon = body
    return hashlib.sha256(path.encode() + b"\0" + canon).hexdigest()


def schedule_value(seed: int, fingerprint: str, attempt: int) -> float:
    """A uniform draw in [0, 1) fixed by (seed, request fingerprint, attempt number)."""
    digest = hashlib.sha256(f"{seed}|{fingerprint}|{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class FaultInjector:
    """Picks faults by a per-request schedule (see the module docstring) and counts what it injected."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._attempts: Counter = Counter()
        self.counts: Counter = Counter()
        self.requests = 0

    def kind_for(self, fingerprint: str, attempt: int) -> str | None:
        """The fault the `attempt`-th (1-based) arrival of request `fingerprint` gets, or None."""
        x = schedule_value(self.config.seed, fingerprint, attempt)
        acc = 0.0
        for kind in FAULT_KINDS:
            acc += self.config.rates.get(kind, 0.0)
            if x < acc:
                return kind
        return None

    def draw(self, fingerprint: str) -> str | None:
        """Count one more arrival of `fingerprint` and return the fault it gets (None: serve it)."""
        with self._lock:
            self.requests += 1
            self._attempts[fingerprint] += 1
            kind = self.kind_for(fingerprint, self._attempts[fingerprint])
            if kind is not None:
                self.counts[kind] += 1
            return kind

    @property
    def total(self) -> int:
        """Number of faults injected so far."""
        return sum(self.counts.values())


async def _send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Send a complete response with a JSON content type."""
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": base + list(headers)})
    await send({"type": "http.response.body", "body": body})


def _bad_body(kind: str, path: str) -> bytes:
    """A 200 body that parses as JSON but holds no usable answer, shaped for the endpoint at `path`."""
    chat = path.endswith("/chat/completions")
    body: dict[str, Any] = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-injected",
        "object": "chat.completion" if chat else "text_completion",
        "created": 0,
        "model": "injected",
        "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1},
    }
    if kind == "empty_content":
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": ""}
        else:
            choice["text"] = ""
        body["choices"] = [choice]
    return json.dumps(body).encode()


def _error_body(message: str, type_: str, code: str | None = None) -> bytes:
    """An OpenAI-style error body."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class FaultMiddleware:
    """ASGI middleware that injects the configured faults in front of the completion endpoints."""

    def __init__(self, app: App, injector: FaultInjector) -> None:
        self.app = app
        self.injector = injector
        server_log = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _HideInjectedDrops) for f in server_log.filters):
            server_log.addFilter(_HideInjectedDrops())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cfg = self.injector.config
        if scope["type"] != "http" or scope.get("path") not in cfg.paths:
            await self.app(scope, receive, send)
            return
        body, gone = await read_body(receive)
        if gone:
            return
        client_receive, receive = receive, replay_body(body, receive)
        kind = self.injector.draw(request_fingerprint(scope["path"], body))
        if cfg.latency > 0:
            await asyncio.sleep(cfg.latency)
        if kind is None:
            await self.app(scope, receive, send)
        elif kind == "429":
            body = _error_body("Rate limit reached (injected fault).", "rate_limit_error", "rate_limit_exceeded")
            await _send_json(send, 429, body, [(b"retry-after", f"{cfg.retry_after:g}".encode())])
        elif kind in ("500", "503"):
            body = _error_body(f"Injected server error {kind}.", "server_error")
            await _send_json(send, int(kind), body)
        elif kind == "slow":
            # Stall until the client gives up (its timeout) or slow_seconds pass, then serve.
            try:
                message = await asyncio.wait_for(client_receive(), timeout=cfg.slow_seconds)
            except asyncio.TimeoutError:
                message = {}
            if message.get("type") != "http.disconnect":
                await self.app(scope, receive, send)
        elif kind == "drop":
            # Start a response, send part of it, then fail: the server closes the socket.
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
                }
            )
            await send({"type": "http.response.body", "body": b'{"id": "chatcmpl-', "more_body": True})
            raise InjectedDrop("connection dropped on purpose")
        elif kind == "malformed":
            await _send_json(send, 200, b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"ind')
        elif kind in ("no_choices", "empty_content"):
            await _send_json(send, 200, _bad_body(kind, scope["path"]))
