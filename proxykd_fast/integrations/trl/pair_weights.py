"""Per-pair weights for ProxyDPOTrainer: a dataset column (checked, then collated) and TRL's WPO weights.

Both become `dpo_loss(sample_weight=w)`: loss = sum_b w_b l_b / B, the weights not renormalised per
batch (so all ones is the unweighted loss, a weight of 2 counts a pair twice, and gradient
accumulation stays exact). The `sft` term (the chosen NLL) is not weighted.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import torch
from torch import Tensor

# Arrow value types a weight column may have (bool is refused: True/False is no weight).
_NUMERIC = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def check_weight_column(dataset: Any, column: str, split: str) -> None:
    """ValueError / TypeError naming `column` unless every row of `dataset` has a finite weight >= 0.

    `dataset` may be None, a `datasets.Dataset`, a dict of them (TRL's eval sets) or an
    IterableDataset (only the column's presence is checked here; values are checked per batch).
    """
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for name, ds in dataset.items():
            check_weight_column(ds, column, f"{split}[{name!r}]")
        return
    names = getattr(dataset, "column_names", None)
    if names is None:  # an IterableDataset of unknown features: the collator checks each batch
        return
    if column not in names:
        raise ValueError(f"sample_weight_column={column!r} is not a column of the {split} dataset "
                         f"(columns: {sorted(names)}); add one float weight per pair (1.0 for unweighted)")
    feature = dataset.features[column] if getattr(dataset, "features", None) else None
    dtype = getattr(feature, "dtype", None)
    if dtype not in _NUMERIC:
        raise TypeError(f"sample_weight_column={column!r} of the {split} dataset must hold one number per pair, "
                        f"got {feature}")
    if not hasattr(dataset, "with_format"):  # an IterableDataset with known features
        return
    values = dataset.with_format("arrow")[column]
    if values.null_count:
        raise ValueError(f"sample_weight_column={column!r} of the {split} dataset has {values.null_count} "
                         "missing value(s)")
    w = torch.tensor(values.to_numpy(zero_copy_only=False), dtype=torch.float64)
    _check_values(column, w, split)


def _check_values(column: str, w: Tensor, where: str) -> None:
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        raise ValueError(f"sample_weight_column={column!r} must be finite, got {w[bad][0].item()} at row "
                         f"{int(bad.nonzero()[0])} of the {where}")
    neg = w < 0
    if bool(neg.any()):
        raise ValueError(f"sample_weight_column={column!r} must be >= 0, got {w[neg][0].item()} at row "
                         f"{int(neg.nonzero()[0])} of the {where}")


def pair_weight_tensor(column: str, values: list[Any]) -> Tensor:
    """The batch's weights as a float32 [B] tensor; ValueError / TypeError naming the column otherwise."""
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"sample_weight_column={column!r} must hold one number per pair, got "
                            f"{type(v).__name__} {v!r} at row {i} of the batch")
    w = torch.tensor([float(v) for v in values], dtype=torch.float64)
    _check_values(column, w, "batch")
    if bool((w > torch.finfo(torch.float32).max).any()):
        raise ValueError(f"sample_weight_column={column!r} must fit in float32, got {w.max().item()}")
    return w.float()


class PairWeightCollator:
    """Wraps a preference collator: the batch also carries `column` as a float32 [B] tensor of pair weights."""

    def __init__(self, base: Any, column: str) -> None:
        self.base, self.column = base, column

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if any(self.column not in e for e in examples):
            raise ValueError(f"sample_weight_column={self.column!r}: an example of the batch has no such key "
                             f"(keys: {sorted(examples[0])})")
        weights = pair_weight_tensor(self.column, [e[self.column] for e in examples])
        batch = self.base([{k: v for k, v in e.items() if k != self.column} for e in examples])
        batch[self.column] = weights
        return batch


def wpo_weights(aligned_logps: Tensor, mask: Tensor) -> Tensor:
    """WPO's pair weights (Zhou et al. 2024, eq. 2, as TRL 1.16 computes them), detached, fp32 [B].

    `aligned_logps` [M]: log p(y_t) - log sum_v p_v^2 of the M scored tokens, in the order of
    `mask` [2B, T] (True = scored). Per row, w = exp(mean over its tokens), 1 for a row without
    tokens; the pair's weight is w_chosen * w_rejected.
    """
    rows = mask.shape[0]
    row = torch.arange(rows, device=mask.device)[:, None].expand_as(mask)[mask].to(aligned_logps.device)
    sums = torch.zeros(rows, dtype=torch.float32, device=aligned_logps.device)
    sums.index_add_(0, row, aligned_logps.detach().float())
    w = torch.exp(sums / mask.sum(1).clamp_min(1).to(sums))
    return w[: rows // 2] * w[rows // 2 :]

