"""Server-side Idempotency-Key support: a keyed request is computed once, and repeats get that answer.

A repeat that arrives while the first is still running waits for the same work; one that
arrives later gets the stored answer (until it is evicted: oldest first beyond `max_entries`,
or after `ttl_s`). Work keeps running when its client disconnects, so a client that was
killed or timed out and comes back with the same key is not billed twice. Failures are not
stored: the next request with that key computes afresh. A key reused with a different body
is refused (422), as Stripe and the IETF draft do.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

MAX_KEY_LENGTH = 255


class KeyReused(Exception):
    """An Idempotency-Key that was first used with another request body."""


@dataclass
class _Entry:
    fingerprint: str
    task: asyncio.Future
    created: float


class IdempotencyCache:
    """Keyed answers of one event loop (the server's); not thread-safe, and needs none."""

    def __init__(self, max_entries: int = 4096, ttl_s: float = 24 * 3600.0, clock: Callable[[], float] = time.monotonic):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.replays = 0  # requests answered from (or joined to) earlier work under the same key

    def __len__(self) -> int:
        return len(self._entries)

    def start(self, key: str, fingerprint: str, compute: Callable[[], Awaitable[Any]]) -> asyncio.Future:
        """The future answer for `key`: earlier work under the key, or `compute()` started now."""
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None and now - entry.created > self.ttl_s and entry.task.done():
            del self._entries[key]
            entry = None
        if entry is not None:
            if entry.fingerprint != fingerprint:
                raise KeyReused(key)
            self.replays += 1
            return entry.task
        task = asyncio.ensure_future(compute())
        self._entries[key] = _Entry(fingerprint, task, now)
        task.add_done_callback(lambda t, k=key: self._finished(k, t))
        self._evict()
        return task

    def _finished(self, key: str, task: asyncio.Future) -> None:
        """Drop failed work so that the next request with its key computes again."""
        if task.cancelled() or task.exception() is not None:
            entry = self._entries.get(key)
            if entry is not None and entry.task is task:
                del self._entries[key]

    def _evict(self) -> None:
        """Drop the oldest finished answers beyond `max_entries` (work still running is kept)."""
        excess = len(self._entries) - self.max_entries
        if excess <= 0:
            return
        for key in [k for k, e in self._entries.items() if e.task.done()][:excess]:
            del self._entries[key]
