"""Deterministic fault injection for the resume tests: SIGKILL every process right after a given checkpoint.

Set PROXYKD_KILL_AFTER_CHECKPOINT to `N` (any phase) or `<phase>:N` (e.g. `distill:4`, `proxy-dpo-1:2`,
`precompute:2`): once checkpoint N is written and every process has passed the barrier after it, each
process kills itself with SIGKILL, as a preempted job dies, with no cleanup. A training phase's
checkpoint N is the one of step N; precompute's is its N-th target shard (shards 1..N on disk, the
unit its --resume keeps). A test then knows exactly what is on disk without racing a timer. Unset
(always, outside tests): nothing happens.
"""

from __future__ import annotations

import os
import signal

KILL_AFTER_CHECKPOINT = "PROXYKD_KILL_AFTER_CHECKPOINT"


def after_checkpoint(phase: str, step: int) -> None:
    """Called by a stage once checkpoint `step` of `phase` is on disk and every process has passed a barrier."""
    spec = os.environ.get(KILL_AFTER_CHECKPOINT)
    if spec and spec.strip() in (str(step), f"{phase}:{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["KILL_AFTER_CHECKPOINT", "after_checkpoint"]
