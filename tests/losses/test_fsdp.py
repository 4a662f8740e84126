"""FSDP2 (fully_shard, gloo, 2 CPU ranks): a fused loss gives the single-process loss and, after one
optimizer step, the same weights.

Untied: the backbone and the head are separate FSDP units, so `lm_head.weight` is a sharded DTensor
where the loss reads it (the trap of fused heads under FSDP2): the loss gathers it once per call and
its gradient is reduce-scattered back, averaged over ranks as FSDP2 averages every other gradient.
Tied (the head is the embedding): the model is one FSDP unit and the fused loss runs in a method
registered with `register_fsdp_forward_method`, so FSDP unshards the shared weight around it and
reduce-scatters both of its gradients (embedding and head) itself.
"""

from __future__ import annotations

import os
import socket
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

VOCAB, HIDDEN, SEQ = 53, 16, 9


def _model(tied: bool) -> torch.nn.Module:
    from proxykd_fast.demo.world import build_llama

    model = build_llama(VOCAB, HIDDEN, 2, 32, 2, seed=0)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.float()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (input_ids, labels) batch per rank; prompts ignored, different lengths of answer."""
    g = torch.Generator().manual_seed(1)
    out = []
    for prompt in (3, 5):
        ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
        labels = ids.roll(-1, 1)
        labels[:, :prompt] = -100
        labels[:, -1] = -100
        out.append((ids, labels))
    return out


def _loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    from proxykd_fast.losses import linear_cross_entropy, proxy_kd_loss

    hidden = model.model(input_ids=ids).last_hidden_state
    if kind == "ce":
        return linear_cross_entropy(hidden, model.lm_head.weight, labels, chunk_size=5)
    g = torch.Generator().manual_seed(int(ids.sum()))
    topk = torch.log_softmax(torch.randn(*labels.shape, 4, generator=g), -1)
    topk_ids = torch.randint(0, VOCAB, (*labels.shape, 4), generator=g)
    return proxy_kd_loss(hidden, model.lm_head.weight, labels, proxy_topk_ids=topk_ids, proxy_topk_logprobs=topk,
                         alpha=0.5, chunk_size=5)


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full (gathered) tensor."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.named_parameters()}


def _worker(rank: int, world: int, port: int, out_dir: str, kind: str, tied: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model(tied)
        ids, labels = _batches()[rank]
        if tied:
            from torch.distributed.fsdp import register_fsdp_forward_method

            model.fused_loss = types.MethodType(lambda self, i, y: _loss(self, i, y, kind), model)
            fully_shard(model)
            register_fsdp_forward_method(model, "fused_loss")
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            loss = model.fused_loss(ids, labels)
        else:
            fully_shard(model.model)
            fully_shard(model.lm_head)  # its own unit: lm_head.weight is a DTensor outside its forward
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            loss = _loss(model, ids, labels, kind)
        loss.backward()
        opt.step()
        state = _full_state(model)
        if rank == 0:
            torch.save(state, Path(out_dir) / "rank0.pt")
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            torch.save(torch.stack(losses), Path(out_dir) / "losses.pt")
    finally:
        dist.destroy_process_group()


def _single(kind: str, tied: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-rank losses, and the weights after one step on their mean (what FSDP's averaged gradients give)."""
    model = _model(tied)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = torch.stack([_loss(model, ids, labels, kind) for ids, labels in _batches()])
    losses.mean().backward()
    opt.step()
    return losses.detach(), {k: v.detach().clone() for k, v in model.named_parameters()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("kind", "tied"), [("ce", False), ("kd", False), ("ce", True)])
def test_fsdp2_step_equals_single_process_step(kind: str, tied: bool, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), kind, tied), nprocs=2, join=True)
    want_losses, want_state = _single(kind, tied)
    got_losses = torch.load(tmp_path / "losses.pt", weights_only=True)
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-6, atol=1e-7)
    for name, want in want_state.items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=f"{name} after one step")


def test_dtensor_weight_is_cast_before_the_gather() -> None:
    """Under mixed precision the head is gathered in the hidden states' dtype, not as its fp32 master."""
    from proxykd_fast.losses._vocab_parallel import compute_dtype

    assert compute_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.bfloat16
    assert compute_dtype(torch.zeros(1, dtype=torch.float32)) is None
