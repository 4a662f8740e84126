"""Vocab-parallel state and collectives, and the one-gather rule for DTensor (FSDP2) head weights.

With a `vocab_parallel_group`, each rank holds a contiguous shard of the head's rows (in rank
order, sizes may differ) and the same hidden states, labels and targets. Each chunk's logits are
local [C, V_r]; the torch row epilogue all-reduces only per-row statistics (row max, sum-exp, the
label logit, the divergence partial sums), the engine all-reduces dX once per pass, and dW / db
stay local: this rank's rows of the full gradient. No logits are ever gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed import ProcessGroup
except ImportError:  # torch built without distributed support
    ProcessGroup = object


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [offset, offset + local) of a vocabulary of `vocab` rows over `group`."""

    group: object  # torch.distributed.ProcessGroup
    offset: int
    local: int
    vocab: int
    world: int

    def max_(self, t: Tensor) -> Tensor:
        """In-place all-reduce MAX over the group."""
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def sum_(self, t: Tensor) -> Tensor:
        """In-place all-reduce SUM over the group."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def localize(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(local column of each global id, clamped into range; whether this rank owns it)."""
        local = ids - self.offset
        owned = (local >= 0) & (local < self.local)
        return torch.where(owned, local, torch.zeros_like(local)), owned

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's copy of t (same shape on every rank)."""
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return out


def make_shard(group: object, local_rows: int, device: torch.device) -> VocabShard:
    """The shard of this rank from every rank's row count (one small all-gather)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel_group needs an initialized torch.distributed process group")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    backend_device = device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    sizes = torch.tensor([local_rows], dtype=torch.int64, device=backend_device)
    every = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(every, sizes, group=group)
    counts = [int(c) for c in every]
    if min(counts) < 1:
        raise ValueError(f"every rank of vocab_parallel_group must hold >= 1 vocabulary row, got {counts}")
    return VocabShard(group, sum(counts[:rank]), local_rows, sum(counts), world)


def check_same_on_every_rank(shard: VocabShard, name: str, t: Tensor) -> None:
    """Refuse inputs that differ across the group (vocab-parallel needs replicated tokens and targets)."""
    rows = t.reshape(t.shape[0], -1).sum(1, dtype=torch.float64) if t.dim() else t.double().view(1)
    probe = torch.stack([rows.sum(), (rows * torch.arange(rows.numel(), dtype=torch.float64, device=t.device)).sum()])
    lo, hi = probe.clone(), probe.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=shard.group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=shard.group)
    if not torch.equal(lo, hi):
        raise ValueError(f"{name} differs across the ranks of vocab_parallel_group; every rank must pass the same "
                         f"{name} (only the head's rows are sharded)")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def compute_dtype(hidden: Tensor | None) -> torch.dtype | None:
    """The dtype a gathered head weight is used in: the hidden states' low precision, else its own."""
    if isinstance(hidden, Tensor) and hidden.dtype in (torch.bfloat16, torch.float16):
        return hidden.dtype
    return None


def gather_dtensor(weight: Tensor | None, compute_dtype: torch.dtype | None) -> Tensor | None:
    """A DTensor head weight (FSDP2-sharded, or a tied embedding) gathered once, in the compute dtype.

    The shards are cast to `compute_dtype` before the all-gather (under MixedPrecisionPolicy that is the
    activations' dtype, not the fp32 master), and the full weight's gradient flows back as a partial
    sum, reduce-scattered onto the sharded parameter and divided by the mesh size: the mean over
    ranks, as FSDP2 reduces every other gradient. Plain tensors pass through unchanged.
    """
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # torch without DTensor
        return weight
    if weight is None or not isinstance(weight, DTensor):
        return weight
    if compute_dtype is not None and weight.dtype != compute_dtype:
        weight = weight.to(compute_dtype)
    mesh = weight.device_mesh
    full = weight.full_tensor(grad_placements=[Partial()] * mesh.ndim)
    return _ScaleGrad.apply(full, 1.0 / mesh.size())
