"""Run under `torchrun --nproc-per-node 2` (gloo, CPU): fused-head gradients under DDP and FSDP2.

Each rank takes its half of the batch; the loss is normalised by the global token count and scaled
by the world size (DDP and FSDP2 average gradients), as HF Trainer does. Rank 0 saves the full
gradients of every setup to argv[1] for the test to compare with one process on the whole batch.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from proxykd_fast.integrations.hf import fuse_lm_head, hidden_and_head, shift_labels
from proxykd_fast.losses import linear_cross_entropy
from tests.support.tiny_lm import batch, build


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients as full tensors (FSDP2 keeps sharded DTensors)."""
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        out[n.replace("_orig_mod.", "")] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _local(b: dict[str, torch.Tensor], rank: int, world: int) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's rows and the global number of scored tokens."""
    n_items = int((b["labels"][:, 1:] != -100).sum())
    return {k: v[rank::world] for k, v in b.items()}, n_items


def _fused_step(model: torch.nn.Module, b: dict, n_items: int, world: int) -> None:
    loss = model(**b, num_items_in_batch=n_items).loss * world
    loss.backward()


def _hidden_and_head_step(model: torch.nn.Module, b: dict, n_items: int, world: int) -> None:
    hidden, weight, bias = hidden_and_head(model, b["input_ids"], b["attention_mask"])
    loss = linear_cross_entropy(hidden, weight, shift_labels(b["labels"]), bias=bias, num_items_in_batch=n_items,
                                backend="torch") * world
    loss.backward()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    b, n_items = _local(batch(rows=4, width=9, seed=5), rank, world)
    mesh = init_device_mesh("cpu", (world,))
    results = {}

    ddp_model = fuse_lm_head(build("llama"), backend="torch")
    _fused_step(DistributedDataParallel(ddp_model), b, n_items, world)
    results["ddp"] = _full_grads(ddp_model)

    def fsdp(shard_head: bool) -> torch.nn.Module:
        model = fuse_lm_head(build("llama"), backend="torch")
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        if shard_head:  # the head as its own unit: its weight is a sharded DTensor outside its forward
            fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    for name, shard_head in (("fsdp2", False), ("fsdp2_head_unit", True)):
        model = fsdp(shard_head)
        _fused_step(model, b, n_items, world)
        results[name] = _full_grads(model)
    model = fsdp(False)
    _hidden_and_head_step(model, b, n_items, world)
    results["fsdp2_hidden_and_head"] = _full_grads(model)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
