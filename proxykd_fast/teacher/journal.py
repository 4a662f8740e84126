"""The in-flight journal: which units were sent but not answered, so a resumed run knows what may be billed.

Every attempt appends `{"prompt_hash", "generation", "event": "sent"}` before its request
leaves (the line reaches the OS at once, so a kill -9 cannot lose it); a unit that ends as a
recorded failure appends `"event": "failed"`. A unit with a record in records.jsonl is done.
On open, the journal is read and compacted to the units still pending, and tells the run
- `generations`: the idempotency-key generation each pending unit last used, so its next
  request repeats that key (a server honouring Idempotency-Key replays instead of billing);
- `interrupted`: the units whose last request was in flight when a run stopped: the server
  may have billed them, and without idempotency support they are billed again on resume.
"""

from __future__ import annotations

from pathlib import Path

from proxykd_fast.jsonl import repair_jsonl, write_jsonl

from .store import OutputDir, iter_jsonl

INFLIGHT_FILE = "inflight.jsonl"


class InflightJournal:
    """Durable record of requests sent per unit (see the module docstring)."""

    def __init__(self, store: OutputDir) -> None:
        self.store = store
        self.path: Path = store.path / INFLIGHT_FILE
        self.generations: dict[str, int] = {}
        self.interrupted: set[str] = set()
        self._appender = None

    def open(self, done: set[str]) -> None:
        """Read and compact the journal (dropping done units), then open it for appending."""
        repair_jsonl(self.path)
        state: dict[str, tuple[int, bool]] = {}
        for row in iter_jsonl(self.path):
            h, g, event = row.get("prompt_hash"), row.get("generation"), row.get("event")
            if isinstance(h, str) and isinstance(g, int) and not isinstance(g, bool) and event in ("sent", "failed"):
                state[h] = (g, event == "sent")
        pending = {h: v for h, v in state.items() if h not in done}
        self.generations = {h: g for h, (g, _) in pending.items()}
        self.interrupted = {h for h, (_, in_flight) in pending.items() if in_flight}
        rows = [
            {"prompt_hash": h, "generation": g, "event": "sent" if in_flight else "failed"}
            for h, (g, in_flight) in pending.items()
        ]
        write_jsonl(self.path, rows)
        self._appender = self.store.appender(INFLIGHT_FILE)

    def sent(self, prompt_hash: str, generation: int) -> None:
        """Note that a request for `prompt_hash` with key generation `generation` is about to leave."""
        self._appender.write({"prompt_hash": prompt_hash, "generation": generation, "event": "sent"})

    def failed(self, prompt_hash: str, generation: int) -> None:
        """Note that `prompt_hash` ended as a recorded failure; its next request uses `generation`."""
        self._appender.write({"prompt_hash": prompt_hash, "generation": generation, "event": "failed"})

    def sync_stale(self) -> None:
        """Time-based fsync (cheap when nothing is pending)."""
        if self._appender is not None:
            self._appender.sync_stale()

    def close(self) -> None:
        """Sync and close the file."""
        if self._appender is not None:
            self._appender.close()
            self._appender = None
