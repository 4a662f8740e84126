"""Split per-example work (generation, reference log-probs) across DDP ranks and gather it back in order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def shard_map(acc: Any, items: Sequence[T], fn: Callable[[list[T]], list[R]]) -> list[R]:
    """`fn` over this rank's share items[rank::world], gathered into the original order on every rank.

    With one process this is exactly `fn(items)`; `fn` must return one result per input item.
    """
    world, rank = acc.num_processes, acc.process_index
    if world == 1:
        return list(fn(list(items)))
    mine = list(fn(list(items[rank::world])))
    if len(mine) != len(items[rank::world]):
        raise ValueError(f"shard_map: fn returned {len(mine)} results for {len(items[rank::world])} items")
    from accelerate.utils import gather_object

    parts = gather_object([mine])  # one list per rank, in rank order
    out: list[Any] = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out
