"""The one no-grad scoring loop of the stages: batch the items, run the model(s), hand the heads to a function.

Held-out NLL and KL, the online proxy's dataset weights, align-proxy's reference log-probs and
precompute's top-k targets all run it: batches of `batch_size` items, moved to the model's device,
each model run through `HiddenAndHead` (backbone hidden states and the head, never full logits),
with a tqdm bar counting items; the models' train/eval modes are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .data import iter_chunks
from .modeling import HiddenAndHead

T = TypeVar("T")
R = TypeVar("R")
Head = tuple[Tensor, Tensor, Tensor | None]  # (hidden [B, T, H], head weight [V, H], head bias [V] or None)


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
) -> list[R]:
    """Concatenated `fn(chunk, batch, *heads)` over batches of `items`, one head per model.

    `fn` returns a list: one result per item for per-item work, or one per batch for sums. `bar`
    (an open tqdm bar advanced by items) replaces the loop's own bar.
    """
    from tqdm.auto import tqdm

    models = [models] if isinstance(models, nn.Module) else list(models)
    modes = [m.training for m in models]
    wrapped = [HiddenAndHead(m) for m in models]
    device = next(models[0].parameters()).device
    out: list[R] = []
    own = bar is None
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False) if own else bar
    try:
        for m in models:
            m.eval()
        for chunk in iter_chunks(list(items), batch_size):
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in make_batch(chunk).items()}
            heads = [w(batch["input_ids"], batch["attention_mask"]) for w in wrapped]
            out.extend(fn(chunk, batch, *heads))
            bar.update(len(chunk))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
        if own:
            bar.close()
    return out
