"""Split no-grad work (scoring batches, generation chunks) across processes and gather it back in order.

Task i (one batch, one generation chunk) runs on process i mod world, and every task is the same
computation whatever the number of processes (the same items in the same batch), so the gathered
results equal a single process's. Under FSDP every forward is a collective: `lockstep` makes each
process run the same number of tasks, one out of tasks repeating task 0 and dropping the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")


def map_tasks(acc: Any, n: int, run: Callable[[int], R], *, lockstep: bool = False,
              after_round: Callable[[list[int]], None] | None = None) -> list[R]:
    """[run(0), ..., run(n - 1)] on every process, task i computed by process i mod world.

    `after_round(indices)` is called on every process after each round of `world` tasks with the
    indices the round covered (for progress bars).
    """
    world = 1 if acc is None else acc.num_processes
    rank = 0 if acc is None else acc.process_index
    if world == 1:
        out = []
        for i in range(n):
            out.append(run(i))
            if after_round is not None:
                after_round([i])
        return out
    mine: list[tuple[int, R]] = []
    for r in range(-(-n // world)):
        i = r * world + rank
        if i < n:
            mine.append((i, run(i)))
        elif lockstep:
            run(0)  # keep the collectives of FSDP's forwards in step; the result is task 0's again
        if after_round is not None:
            after_round(list(range(r * world, min(n, (r + 1) * world))))
    from accelerate.utils import gather_object

    results: list[Any] = [None] * n
    for part in gather_object([mine]):  # one list per process, in process order
        for i, value in part:
            results[i] = value
    return results


__all__ = ["map_tasks"]
