"""Two gloo processes (DDP through accelerate) produce the same gradients as one process on the full batch.

Also: the DPO round loss (pairs and chosen tokens normalised separately) is exact under DDP, and
per-example work (reference log-probs, rejected samples) is sharded over ranks and gathered in order.
"""

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


def _pairs() -> list:
    """4 preference pairs with different chosen / rejected lengths."""
    from proxykd_fast.pipeline.data import Example

    g = torch.Generator().manual_seed(2)

    def seq(n: int) -> list[int]:
        return torch.randint(4, VOCAB, (n,), generator=g).tolist()

    return [Example(i, seq(3), seq(c), seq(r)) for i, (c, r) in enumerate([(10, 3), (2, 7), (8, 4), (4, 9)])]


def _grads(rank: int, world: int, out: str) -> None:
    """Accumulate this rank's share with the trainer's helper and save the synced gradients."""
    from proxykd_fast.pipeline.align import (
        count_tokens,
        dpo_count_fn,
        dpo_loss_fn,
        reference_logps,
        sample_rejected,
        sft_loss_fn,
    )
    from proxykd_fast.pipeline.config import AlignProxyConfig
    from proxykd_fast.pipeline.data import preference_batch
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
    result = {"sft": {n: p.grad.clone() for n, p in model.named_parameters()}}
    model.zero_grad(set_to_none=True)
    cfg = AlignProxyConfig(beta=0.5, nll_alpha=1.0, eval_batch_size=2, gen_batch_size=2, gen_max_new_tokens=4,
                           progress=False)
    pairs = _pairs()
    ref = reference_logps(model, pairs, 0, cfg, acc=acc)  # sharded over ranks, gathered in order
    dpo_batches = []
    for i in range(len(pairs)):
        b = preference_batch([pairs[i]], 0)
        b["ref_logps"] = ref[i : i + 1]
        dpo_batches.append(b)
    accumulate_gradients(acc, prepared, dpo_batches[rank::world], dpo_count_fn(cfg), dpo_loss_fn(cfg))
    result["dpo"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    result["ref"] = ref

    class Tok:
        pad_token_id, eos_token_id = 0, 2

    result["rejected"] = sample_rejected(model, Tok(), pairs, cfg, seed=0, acc=acc)
    torch.save(result, f"{out}.{rank}")
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
    a = torch.load(f"{single}.0", weights_only=True)
    b, b1 = (torch.load(f"{multi}.{r}", weights_only=True) for r in (0, 1))
    for part in ("sft", "dpo"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-5, atol=1e-7, msg=f"{part}: {k}")
    torch.testing.assert_close(b["ref"], a["ref"], rtol=1e-5, atol=1e-5)  # each rank scored half, same order
    assert b["rejected"] == b1["rejected"] and len(b["rejected"]) == 4  # every rank holds all samples
