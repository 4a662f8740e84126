"""Offline proxy targets as a `datasets.Dataset`, and the collator that lines them up with the shifted labels.

`load_precomputed(dir)` reads what `proxykd precompute` writes (sharded parquet or safetensors plus
manifest.json and weights.parquet) into one row per sample: `input_ids`, `labels` (prompt = -100, so
SFTTrainer keeps them as they are), flat `topk_ids` / `topk_logprobs` (k per answer token, in order),
`sample_weight` (the dataset-statistics weight), `loglik` and `n_tokens` (for batch statistics).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from proxykd_fast.integrations.hf import IGNORE_INDEX

TARGET_COLUMNS = ("topk_ids", "topk_logprobs", "sample_weight", "loglik", "n_tokens")


def _rows(root: Path, manifest: dict[str, Any]) -> Any:
    """Yield one dict per stored sample, shard by shard (memory stays at one shard)."""
    from proxykd_fast.pipeline.targets import read_shard

    for name in manifest["shards"]:
        for r in read_shard(root / name, manifest["top_k"]):
            yield {"index": r.index, "input_ids": list(r.input_ids),
                   "labels": [IGNORE_INDEX] * r.prompt_len + list(r.input_ids[r.prompt_len:]),
                   "topk_ids": r.topk_ids.reshape(-1).tolist(), "topk_logprobs": r.topk_logprobs.reshape(-1).tolist(),
                   "loglik": float(r.loglik), "n_tokens": int(r.n_tokens)}


def load_precomputed(path: str | Path, *, tokenizer: Any = None, loglik: str | None = None,
                     normalize_weights: bool | None = None) -> Any:
    """The targets of a finished `proxykd precompute` run as a `datasets.Dataset` for `ProxyKDTrainer`.

    `tokenizer`, when given, must have the vocabulary the targets were made with. `loglik` /
    `normalize_weights` recompute `sample_weight` from the stored log-likelihoods when they differ from
    the run's settings (by default the run's weights are used as written).
    """
    import datasets

    from proxykd_fast.pipeline.targets import WEIGHTS, load_manifest, sigmoid_weights, vocab_fingerprint

    root = Path(path)
    manifest = load_manifest(root)
    if tokenizer is not None and manifest["vocab_fingerprint"] != vocab_fingerprint(tokenizer):
        raise ValueError(
            f"the targets in {root} were made with another vocabulary ({manifest['vocab_size']} tokens) than the "
            f"tokenizer ({len(tokenizer)} tokens): Proxy-KD needs one shared vocabulary")
    ds = datasets.Dataset.from_generator(_rows, gen_kwargs={"root": root, "manifest": manifest},
                                         keep_in_memory=True)
    mode = manifest["loglik"] if loglik is None else loglik
    normalize = manifest["normalize_weights"] if normalize_weights is None else normalize_weights
    if (mode, normalize) == (manifest["loglik"], manifest["normalize_weights"]) and (root / WEIGHTS).exists():
        import pyarrow.parquet as pq

        table = pq.read_table(root / WEIGHTS).to_pydict()
        by_index = dict(zip(table["index"], table["weight"]))
        weights = [float(by_index[i]) for i in ds["index"]]
    else:
        weights = sigmoid_weights(torch.tensor(ds["loglik"], dtype=torch.float64), torch.tensor(ds["n_tokens"]),
                                  mode, normalize).tolist()
    ds = ds.add_column("sample_weight", weights)
    return ds.sort("index")


def _scored_positions(labels: Tensor) -> list[Tensor]:
    """Per row, the shifted positions t (label of t+1 is not -100) in order."""
    valid = labels[:, 1:] != IGNORE_INDEX
    return [row.nonzero().view(-1) for row in valid]


def _as_matrix(name: str, values: Any, n_tokens: int | None, row: int, dtype: torch.dtype) -> Tensor:
    """One row's targets as [n, k]: nested [n][k] lists, or a flat list of n_tokens * k entries."""
    t = torch.as_tensor(values, dtype=dtype)
    if t.dim() == 2:
        return t
    if t.dim() != 1 or n_tokens is None:
        raise ValueError(f"{name} of row {row} must be [n_tokens][k] or a flat list with an n_tokens column, "
                         f"got shape {tuple(t.shape)}")
    if n_tokens <= 0 or t.numel() % n_tokens:
        raise ValueError(f"{name} of row {row} has {t.numel()} entries, not a multiple of n_tokens={n_tokens}")
    return t.view(n_tokens, -1)


def align_topk(labels: Tensor, topk_ids: list[Any], topk_logprobs: list[Any], n_tokens: list[int] | None = None,
               truncation_mode: str = "keep_start") -> tuple[Tensor, Tensor]:
    """[B, T, k] top-k ids / log-probs at the shifted positions of `labels` [B, T] (HF unshifted labels).

    Row i holds k entries per answer token, in order ([n][k], or flat with `n_tokens[i]` tokens). When
    truncation dropped answer tokens, the kept ones are the first (`keep_start`) or last (`keep_end`).
    Unscored positions get a uniform distribution over ids 0..k-1 (never read: their labels are ignored).
    """
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}")
    bsz, width = labels.shape
    rows = []
    for i in range(bsz):
        n = None if n_tokens is None else int(n_tokens[i])
        ids = _as_matrix("topk_ids", topk_ids[i], n, i, torch.long)
        lps = _as_matrix("topk_logprobs", topk_logprobs[i], n, i, torch.float32)
        if ids.shape != lps.shape:
            raise ValueError(f"row {i}: topk_ids {tuple(ids.shape)} and topk_logprobs {tuple(lps.shape)} differ")
        rows.append((ids, lps))
    ks = {ids.shape[1] for ids, _ in rows}
    if len(ks) != 1:
        raise ValueError(f"every row must carry the same k top-k entries per token, got k in {sorted(ks)}")
    k = ks.pop()
    out_ids = torch.arange(k).expand(bsz, width, k).clone()
    out_lps = torch.full((bsz, width, k), -math.log(k))
    for i, (pos, (ids, lps)) in enumerate(zip(_scored_positions(labels), rows)):
        m, n = int(pos.numel()), ids.shape[0]
        if m > n:
            raise ValueError(f"row {i} scores {m} answer tokens but carries top-k targets for only {n}")
        keep = slice(0, m) if truncation_mode == "keep_start" else slice(n - m, n)
        out_ids[i, pos], out_lps[i, pos] = ids[keep], lps[keep]
    return out_ids, out_lps


class ProxyTargetsCollator:
    """Wraps TRL's collator: pads top-k targets to [B, T, k] on the shifted labels and stacks per-sample columns."""

    def __init__(self, base: Any, truncation_mode: str = "keep_start") -> None:
        self.base, self.truncation_mode = base, truncation_mode

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        extra = {c: [e.pop(c) for e in examples] for c in TARGET_COLUMNS if c in examples[0]}
        batch = self.base(examples)
        if "topk_ids" in extra:
            if "labels" not in batch or batch["labels"].dim() != 2:
                raise ValueError("offline top-k targets need padded [B, T] labels (packing/padding-free is refused)")
            batch["topk_ids"], batch["topk_logprobs"] = align_topk(
                batch["labels"], extra["topk_ids"], extra["topk_logprobs"], extra.get("n_tokens"),
                self.truncation_mode)
        for c in ("sample_weight", "loglik"):
            if c in extra:
                batch[c] = torch.tensor(extra[c], dtype=torch.float64 if c == "loglik" else torch.float32)
        if "n_tokens" in extra:
            batch["n_tokens"] = torch.tensor(extra["n_tokens"], dtype=torch.long)
        return batch
