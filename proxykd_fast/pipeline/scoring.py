"""The one no-grad scoring loop of the stages: batch the items, run the model(s), hand the heads to a function.

Held-out NLL and KL, the online proxy's dataset weights, align-proxy's reference log-probs and
precompute's top-k targets all run it: batches of `batch_size` items, moved to the model's device,
each model run through `HiddenAndHead` (backbone hidden states and the head, never full logits),
with a tqdm bar counting items; the models' train/eval modes are restored afterwards. With an
accelerator of several processes the batches are split across them (`map_tasks`: the same batches
as one process, so the same results) and gathered on every process; FSDP-sharded models keep the
processes in step and are released (regathered parameters freed) at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .data import iter_chunks
from .distributed import map_tasks
from .modeling import HiddenAndHead
from .sharding import is_sharded, release

T = TypeVar("T")
R = TypeVar("R")
Head = tuple[Tensor, Tensor, Tensor | None]  # (hidden [B, T, H], head weight [V, H], head bias [V] or None)


def as_wrapper(model: nn.Module) -> HiddenAndHead:
    """`model` itself when it is a HiddenAndHead (as the stages prepare them), else a plain one around it."""
    return model if isinstance(model, HiddenAndHead) else HiddenAndHead(model)


@torch.no_grad()
def score_batches(
    models: nn.Module | Sequence[nn.Module],
    items: Sequence[T],
    make_batch: Callable[[list[T]], dict[str, Tensor]],
    fn: Callable[..., list[R]],
    *,
    batch_size: int,
    desc: str,
    progress: bool = False,
    bar: Any = None,
    acc: Any = None,
) -> list[R]:
    """Concatenated `fn(chunk, batch, *heads)` over batches of `items`, one head per model.

    `fn` returns a list: one result per item for per-item work, or one per batch for sums. `bar`
    (an open tqdm bar advanced by items) replaces the loop's own bar. `acc`: split the batches over
    its processes (every process must call this with the same items).
    """
    from tqdm.auto import tqdm

    models = [models] if isinstance(models, nn.Module) else list(models)
    modes = [m.training for m in models]
    wrapped = [as_wrapper(m) for m in models]
    device = next(models[0].parameters()).device
    chunks = list(iter_chunks(list(items), batch_size))
    own = bar is None
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False) if own else bar

    def run(i: int) -> list[R]:
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in make_batch(chunks[i]).items()}
        heads = [w(batch["input_ids"], batch["attention_mask"]) for w in wrapped]
        return list(fn(chunks[i], batch, *heads))

    try:
        for m in models:
            m.eval()
        parts = map_tasks(acc, len(chunks), run, lockstep=any(is_sharded(w) for w in wrapped),
                          after_round=lambda idx: bar.update(sum(len(chunks[i]) for i in idx)))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
        release(wrapped)
        if own:
            bar.close()
    return [r for part in parts for r in part]
