"""Multi-process gloo tests without port races: a file rendezvous instead of a free-port guess.

`spawn(fn, world, tmp_path, *args)` runs fn(rank, world, *args) in `world` processes whose default
process group is initialised through a file under tmp_path (a port found free and then released
can be taken by another process before the workers bind it; a file cannot). The env variables
torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, ...) are set too, for accelerate.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., None], world: int, rdzv: str, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # every rank done before any tears gloo down: a group destroyed while a peer still has collectives
        # in flight can abort that peer ("terminate called without an active exception", SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], world: int, tmp_path: Path, *args: object) -> None:
    """Run fn(rank, world, *args) on `world` gloo ranks (fn must be importable: a module-level function)."""
    rdzv = Path(tmp_path) / f"rdzv-{world}"
    rdzv.unlink(missing_ok=True)
    mp.spawn(_entry, args=(fn, world, str(rdzv), args), nprocs=world, join=True)


LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP")


@contextmanager
def torch_single_thread() -> Iterator[None]:
    """One torch CPU thread (as the spawned processes have, and much faster for tiny models on a small shared
    machine), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def single_process() -> Iterator[None]:
    """A plain one-process run in this process, to compare with `spawn`'s: no launcher environment, and one
    thread, as the spawned processes have (floating-point results can depend on the thread count)."""
    saved = {k: os.environ.pop(k) for k in LAUNCH_ENV if k in os.environ}
    try:
        with torch_single_thread():
            yield
    finally:
        os.environ.update(saved)
