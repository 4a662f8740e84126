"""Batched generation for the local teacher: a worker thread gathers rows and decodes them together.

Each row (one choice of one request) is left-padded into a batch; position ids come from the
attention mask, so padding does not shift positions. Tokens are chosen per row (greedy, or
sampled from the row's own torch.Generator), so a row's output does not depend on the other
rows in its batch beyond float rounding noise (~1e-7 in the logits on CPU float32), which can
only matter at an exact near-tie. Finished rows are dropped from the batch and KV cache.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import choose_token, make_generator

log = logging.getLogger(__name__)


@dataclass
class GenRow:
    """One sequence to generate: prompt ids, limits, sampling settings and where to put the result."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    future: Future = field(default_factory=Future)
    abandoned: bool = False  # set when the client went away: the row is dropped from its batch


@dataclass
class GenResult:
    """Generated token ids (stop token excluded) and why generation ended ("stop" or "length")."""

    token_ids: list[int]
    finish_reason: str


def _select_rows(past: Any, idx: torch.Tensor) -> Any:
    """Keep only the batch rows `idx` of a KV cache (Cache object or legacy tuples)."""
    if hasattr(past, "batch_select_indices"):
        past.batch_select_indices(idx)
        return past
    return tuple(tuple(t[idx] for t in layer) for layer in past)


class GenerationEngine:
    """Owns the model; `submit` rows from any thread, a background worker batches and runs them."""

    def __init__(
        self,
        model: Any,
        *,
        stop_token_ids: set[int],
        pad_token_id: int,
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        num_threads: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.num_threads = num_threads
        self.stop_token_ids = set(stop_token_ids)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max(1, max_batch_size)
        self.batch_wait_s = max(0.0, batch_wait_ms) / 1000.0
        self._queue: queue.Queue[GenRow] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._logits_kw = self._logits_kwarg(model)
        self.batches = 0
        self.rows_done = 0
        self.largest_batch = 0
        self.rows_abandoned = 0

    @staticmethod
    def _logits_kwarg(model: Any) -> dict[str, int]:
        """Ask for last-position logits only when the model's forward supports it (saves memory)."""
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return {}
        return {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="teacher-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after its current batch; fail rows still queued."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                break
            if row.future.set_running_or_notify_cancel():
                row.future.set_exception(RuntimeError("teacher engine stopped"))

    def submit(self, row: GenRow) -> Future:
        """Queue one row; its future resolves to a GenResult."""
        if self._stopping.is_set():
            raise RuntimeError("teacher engine stopped")
        self._queue.put(row)
        return row.future

    def _gather(self) -> list[GenRow]:
        """Wait for a first row, then collect more for up to batch_wait_s or max_batch_size."""
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        rows = []
        for r in batch:
            if r.abandoned:
                r.future.cancel()
                self.rows_abandoned += 1
            if r.future.set_running_or_notify_cancel():
                rows.append(r)
        return rows

    def _loop(self) -> None:
        """Worker: gather a batch, generate, resolve futures; errors fail only that batch."""
        if self.num_threads:
            torch.set_num_threads(self.num_threads)  # process-wide, hence opt-in
        while not self._stopping.is_set():
            rows = self._gather()
            if not rows:
                continue
            try:
                results = self.generate(rows)
            except Exception as exc:  # a failed batch must not kill the server
                log.exception("generation failed for a batch of %d", len(rows))
                for row in rows:
                    row.future.set_exception(exc)
                continue
            for row, result in zip(rows, results):
                row.future.set_result(result)

    @torch.inference_mode()
    def generate(self, rows: list[GenRow]) -> list[GenResult]:
        """Generate all `rows` as one left-padded batch with a KV cache (blocking)."""
        self.batches += 1
        self.rows_done += len(rows)
        self.largest_batch = max(self.largest_batch, len(rows))
        n = len(rows)
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attn[i, width - len(r.prompt_ids) :] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        device = self.device
        ids, attn, pos = ids.to(device), attn.to(device), pos.to(device)
        gens = [make_generator(r.seed) if r.temperature > 0 else None for r in rows]
        outs: list[list[int]] = [[] for _ in rows]
        finish = ["length"] * n
        active = list(range(n))

        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **self._logits_kw)
        past, logits = out.past_key_values, out.logits[:, -1, :].float()
        while True:
            greedy = logits.argmax(-1).tolist()
            keep, next_tokens = [], []
            for j, i in enumerate(active):
                if rows[i].abandoned:
                    finish[i] = "abandoned"
                    self.rows_abandoned += 1
                    continue
                gen = gens[i]
                tok = greedy[j] if gen is None else choose_token(logits[j], rows[i].temperature, rows[i].top_p, gen)
                if tok in self.stop_token_ids:
                    finish[i] = "stop"
                    continue
                outs[i].append(tok)
                if len(outs[i]) >= rows[i].max_new_tokens:
                    continue
                keep.append(j)
                next_tokens.append(tok)
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, dtype=torch.long, device=device)
                past = _select_rows(past, idx)
                attn, pos = attn[idx], pos[idx]
                active = [active[j] for j in keep]
            attn = torch.cat([attn, torch.ones((len(active), 1), dtype=attn.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1
            step = torch.tensor(next_tokens, dtype=torch.long, device=device).unsqueeze(1)
            out = self.model(
                input_ids=step, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True
            )
            past, logits = out.past_key_values, out.logits[:, -1, :].float()
        return [GenResult(o, f) for o, f in zip(outs, finish)]
