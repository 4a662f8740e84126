"""Helpers for teacher tests that must not depend on timing: gates, waits, fault schedules, tiny servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from proxykd_fast.teacher.asgi import App, Receive, Scope, Send, read_body, replay_body
from proxykd_fast.teacher.faults import COMPLETION_PATHS, FaultConfig, FaultInjector, request_fingerprint
from proxykd_fast.teacher.server import TeacherServer
from proxykd_fast.teacher.tiny import tiny_teacher


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; AssertionError naming `what` after `timeout` s (a hang, not a race)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class RequestGate:
    """ASGI middleware numbering completion requests as they fully arrive and holding those past `limit`.

    A test sets `limit`, lets a client run, and waits for `arrived` to reach a count: it then
    knows exactly which requests were answered and which are in flight, whatever the timing.
    Bodies are read before the hold, as a real server has them once the client has sent them.
    """

    def __init__(self, app: App, paths: Iterable[str] = COMPLETION_PATHS) -> None:
        self.app = app
        self.paths = tuple(paths)
        self.limit: float = math.inf
        self.arrived = 0
        self.finished = 0
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        body, gone = await read_body(receive)
        if gone:
            return
        with self._lock:
            self.arrived += 1
            number = self.arrived
        while number > self.limit:
            await asyncio.sleep(0.005)
        try:
            await self.app(scope, replay_body(body, receive), send)
        finally:
            with self._lock:
                self.finished += 1

    def settled(self) -> bool:
        """Every request that arrived has been handled."""
        return self.finished == self.arrived


def chat_body(prompt: Any, model: str, params: dict[str, Any]) -> bytes:
    """The JSON body the collector sends for one chat unit (canonical, as the fault schedule reads it)."""
    return json.dumps({"model": model, "messages": prompt, **params}).encode()


def expected_faults(config: FaultConfig, path: str, bodies: Iterable[bytes], max_attempts: int) -> Counter:
    """Faults the per-request schedule gives when each body is retried until served (at most `max_attempts`)."""
    injector = FaultInjector(config)
    counts: Counter = Counter()
    for body in bodies:
        fingerprint = request_fingerprint(path, body)
        for attempt in range(1, max_attempts + 1):
            kind = injector.kind_for(fingerprint, attempt)
            if kind is None:
                break
            counts[kind] += 1
    return counts


class EngineGate:
    """Hold a GenerationEngine's batches until `release()`: a test then knows what is queued or running.

    Use as a context manager; `entered` counts batches that reached the model. With `hold`, the
    first batch runs as soon as `hold(rows)` is true (polled) and later ones run at once,
    instead of all waiting for `release()`.
    """

    def __init__(self, engine: Any, hold: Callable[[list[Any]], bool] | None = None) -> None:
        self.engine = engine
        self.hold = hold
        self.entered = 0
        self._open = threading.Event()
        self._real = engine.generate

    def _generate(self, rows: list[Any]) -> Any:
        self.entered += 1
        hold = self.hold
        wait_until(lambda: self._open.is_set() or (hold is not None and hold(rows)), "the engine gate to open")
        if hold is not None:
            self.release()
        return self._real(rows)

    def release(self) -> None:
        """Let every held and later batch run."""
        self._open.set()

    def __enter__(self) -> EngineGate:
        self.engine.generate = self._generate
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        del self.engine.generate  # back to the class's method


class SubmissionCounter:
    """Count the rows a GenerationEngine is asked to generate: what a provider bills, replays excluded."""

    def __init__(self, engine: Any) -> None:
        self.rows = 0
        real = engine.submit

        def submit(row: Any) -> Any:
            self.rows += 1
            return real(row)

        engine.submit = submit


@contextlib.contextmanager
def torch_single_thread() -> Iterator[None]:
    """One torch CPU thread (much faster for the tiny model on a small shared machine), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_server(seed: int, **kwargs: Any) -> Iterator[TeacherServer]:
    """A running server (model name "tiny") over the tiny teacher of `seed`: the body of a fixture."""
    with torch_single_thread():
        model, tok = tiny_teacher(seed=seed)
        with TeacherServer(model, tok, model_name="tiny", **kwargs) as srv:
            yield srv
