"""Live counters for a collection run and the tqdm bar that shows them."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm


@dataclass
class Stats:
    """Running totals: done, failed, retries (by reason), units now waiting to retry, tokens, cost."""

    price_input_per_1k: float = 0.0
    price_output_per_1k: float = 0.0
    completed: int = 0
    failed: int = 0
    retries: int = 0
    retrying_now: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_reasons: Counter = field(default_factory=Counter)
    failure_reasons: Counter = field(default_factory=Counter)

    @property
    def cost(self) -> float:
        """Estimated spend in the price unit (per 1k tokens) of the configured prices."""
        return (
            self.prompt_tokens * self.price_input_per_1k + self.completion_tokens * self.price_output_per_1k
        ) / 1000.0

    def retry_started(self, reason: str) -> None:
        """A unit failed with `reason` and now sleeps before its next attempt."""
        self.retries += 1
        self.retry_reasons[reason] += 1
        self.retrying_now += 1

    def retry_ended(self) -> None:
        """A unit's backoff sleep is over (it tries again, or gives up because the run stops)."""
        self.retrying_now -= 1

    def add_usage(self, usage: dict[str, int]) -> None:
        """Count the tokens of one completed request."""
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.completion_tokens += usage.get("completion_tokens", 0)


class ProgressBar:
    """A tqdm bar over all units whose postfix shows done/failed/retrying, tokens and cost.

    `clock` (monotonic seconds) is injectable so tests can move time without sleeping.
    """

    def __init__(
        self,
        stats: Stats,
        total: int,
        initial: int,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats
        self.clock = clock
        self._last = -float("inf")
        self._dirty = False
        self._shown: dict[str, Any] = {}
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc="collect",
            unit="req",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def _postfix(self) -> dict[str, Any]:
        """The fields shown after the bar."""
        s = self.stats
        return {
            "done": s.completed,
            "failed": s.failed,
            "retrying": s.retrying_now,
            "retries": s.retries,
            "tok": s.prompt_tokens + s.completion_tokens,
            "cost": f"{s.cost:.4f}",
        }

    def refresh(self, advance: int = 0, force: bool = False) -> None:
        """Advance the bar by `advance` units and redraw the counters at most 5 times a second.

        A change that falls inside the 0.2 s window is drawn by the next `flush()`.
        """
        if advance:
            self._bar.update(advance)
        now = self.clock()
        if force or now - self._last > 0.2:
            self._last = now
            self._dirty = False
            self._shown = self._postfix()
            self._bar.set_postfix(self._shown, refresh=True)
        else:
            self._dirty = True

    def flush(self) -> None:
        """Draw counters that changed since the last draw (call it periodically)."""
        if self._dirty:
            self.refresh(force=True)

    @property
    def shown(self) -> dict[str, Any]:
        """The counters as last drawn."""
        return dict(self._shown)

    def close(self) -> None:
        """Draw the final state and release the terminal line."""
        self.refresh(force=True)
        self._bar.close()
