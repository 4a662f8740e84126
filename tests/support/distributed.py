"""Run a function on several gloo CPU processes, or as the one process of a plain run, for the pipeline's tests.

The processes meet through a rendezvous file (no TCP port to pick, so no port race), each with one
thread so that its floating-point results do not depend on the machine's core count, and with the
environment variables `torchrun` sets, so accelerate sees the same multi-process run it would.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP")


def _entry(rank: int, world: int, rendezvous: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, workdir: Path, *args: Any) -> None:
    """`fn(*args)` on `world` processes (rank from the environment); raises when any of them fails or is killed."""
    rendezvous = Path(workdir) / f".rendezvous-{os.getpid()}-{len(list(Path(workdir).glob('.rendezvous-*')))}"
    mp.spawn(_entry, args=(world, str(rendezvous), fn, args), nprocs=world, join=True)


@contextmanager
def single_process() -> Iterator[None]:
    """A plain one-process run in this process: no launcher environment, one thread (as the spawned processes)."""
    saved = {k: os.environ.pop(k) for k in LAUNCH_ENV if k in os.environ}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        os.environ.update(saved)
