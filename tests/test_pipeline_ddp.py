"""Two gloo processes (DDP through accelerate) produce the same gradients as one process on the full batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

VOCAB, SEED = 44, 0


def _model() -> torch.nn.Module:
    from proxykd_fast.demo.world import build_llama

    return build_llama(VOCAB, 16, 1, 32, 2, SEED)


def _batches() -> list[dict[str, torch.Tensor]]:
    """4 rows with different answer lengths, so per-rank token counts differ."""
    from proxykd_fast.pipeline.data import pad_batch

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (9, 6, 12, 7)]
    return [pad_batch([s], [3], 0) for s in seqs]


def _grads(rank: int, world: int, out: str) -> None:
    """Accumulate this rank's share with the trainer's helper and save the synced gradients."""
    from proxykd_fast.pipeline.align import count_tokens, sft_loss_fn
    from proxykd_fast.pipeline.modeling import HiddenAndHead
    from proxykd_fast.pipeline.trainer import accumulate_gradients, make_accelerator

    torch.set_num_threads(1)
    acc = make_accelerator()
    assert acc.num_processes == world
    model = _model()
    prepared = acc.prepare(HiddenAndHead(model))
    batches = _batches()
    mine = batches[rank::world] if world > 1 else batches
    # One micro-batch per row: exercises accumulation (no_sync) and the global item count.
    accumulate_gradients(acc, prepared, mine, count_tokens, sft_loss_fn(None, "torch"))
    if acc.is_main_process:
        torch.save({n: p.grad.clone() for n, p in model.named_parameters()}, out)
    acc.wait_for_everyone()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    _grads(rank, world, out)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_gradients_match_single_process(tmp_path: Path) -> None:
    single = tmp_path / "single.pt"
    env_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k) for k in env_keys if k in os.environ}
    try:
        _grads(0, 1, str(single))
    finally:
        os.environ.update(saved)
    multi = tmp_path / "multi.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(multi)), nprocs=2, join=True)
    a = torch.load(single, weights_only=True)
    b = torch.load(multi, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
