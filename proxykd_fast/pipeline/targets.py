"""Offline proxy targets on disk: sharded parquet or safetensors files plus a manifest JSON."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

MANIFEST = "manifest.json"
WEIGHTS = "weights.parquet"


def vocab_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's token->id map: equal fingerprints mean a shared vocabulary."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


@dataclass
class TargetRow:
    """One sample's stored targets: tokens, prompt length, top-k per answer token, log-likelihood."""

    index: int
    input_ids: list[int]
    prompt_len: int
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    loglik: float
    n_tokens: int


def shard_name(i: int, fmt: str) -> str:
    """File name of shard i."""
    return f"shard-{i:05d}.{'parquet' if fmt == 'parquet' else 'safetensors'}"


def write_shard(path: Path, rows: list[TargetRow], k: int, fmt: str) -> None:
    """Write one shard atomically (temp file then rename), so a kill never leaves a partial shard."""
    tmp = path.with_name("." + path.name + ".tmp")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "index": pa.array([r.index for r in rows], pa.int64()),
            "input_ids": pa.array([r.input_ids for r in rows], pa.list_(pa.int32())),
            "prompt_len": pa.array([r.prompt_len for r in rows], pa.int32()),
            "topk_ids": pa.array([r.topk_ids.reshape(-1).tolist() for r in rows], pa.list_(pa.int32())),
            "topk_logprobs": pa.array([r.topk_logprobs.reshape(-1).tolist() for r in rows], pa.list_(pa.float32())),
            "loglik": pa.array([r.loglik for r in rows], pa.float64()),
            "n_tokens": pa.array([r.n_tokens for r in rows], pa.int32()),
        })
        pq.write_table(table, tmp, compression="zstd")
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        seq_off = np.cumsum([0] + [len(r.input_ids) for r in rows])
        tok_off = np.cumsum([0] + [r.n_tokens for r in rows])
        tensors = {
            "index": torch.tensor([r.index for r in rows], dtype=torch.int64),
            "input_ids": torch.tensor([t for r in rows for t in r.input_ids], dtype=torch.int32),
            "seq_offsets": torch.from_numpy(seq_off.astype(np.int64)),
            "prompt_len": torch.tensor([r.prompt_len for r in rows], dtype=torch.int32),
            "topk_ids": torch.from_numpy(np.concatenate([r.topk_ids.reshape(-1, k) for r in rows]).astype(np.int32)),
            "topk_logprobs": torch.from_numpy(
                np.concatenate([r.topk_logprobs.reshape(-1, k) for r in rows]).astype(np.float32)),
            "tok_offsets": torch.from_numpy(tok_off.astype(np.int64)),
            "loglik": torch.tensor([r.loglik for r in rows], dtype=torch.float64),
            "n_tokens": torch.tensor([r.n_tokens for r in rows], dtype=torch.int32),
        }
        save_file(tensors, str(tmp))
    else:
        raise ValueError(f"unknown targets format {fmt!r} (parquet or safetensors)")
    os.replace(tmp, path)


def read_shard(path: Path, k: int) -> list[TargetRow]:
    """Read every row of one shard."""
    rows = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for r in pq.read_table(path).to_pylist():
            rows.append(TargetRow(r["index"], r["input_ids"], r["prompt_len"],
                                  np.asarray(r["topk_ids"], np.int64).reshape(-1, k),
                                  np.asarray(r["topk_logprobs"], np.float32).reshape(-1, k),
                                  r["loglik"], r["n_tokens"]))
        return rows
    from safetensors.numpy import load_file

    t = load_file(str(path))
    for i in range(len(t["index"])):
        s0, s1 = t["seq_offsets"][i], t["seq_offsets"][i + 1]
        k0, k1 = t["tok_offsets"][i], t["tok_offsets"][i + 1]
        rows.append(TargetRow(int(t["index"][i]), t["input_ids"][s0:s1].tolist(), int(t["prompt_len"][i]),
                              t["topk_ids"][k0:k1].astype(np.int64), t["topk_logprobs"][k0:k1],
                              float(t["loglik"][i]), int(t["n_tokens"][i])))
    return rows


def read_logliks(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Only (index, loglik, n_tokens) of a shard: the cheap second pass for the weight statistics."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(path, columns=["index", "loglik", "n_tokens"])
        return (t.column("index").to_numpy(), t.column("loglik").to_numpy(), t.column("n_tokens").to_numpy())
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return f.get_tensor("index"), f.get_tensor("loglik"), f.get_tensor("n_tokens")


def sigmoid_weights(loglik: Tensor, n_tokens: Tensor, loglik_mode: str = "sum", normalize: bool = False) -> Tensor:
    """w = sigmoid((l - mu) / sigma) with mu/sigma over the given samples; optionally scaled to mean 1."""
    if loglik_mode not in ("sum", "mean"):
        raise ValueError(f"loglik must be 'sum' or 'mean', got {loglik_mode!r}")
    l_val = loglik.double() / n_tokens.double().clamp_min(1) if loglik_mode == "mean" else loglik.double()
    mu = l_val.mean()
    sigma = l_val.std(unbiased=False) if l_val.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    w = torch.sigmoid((l_val - mu) / sigma) if float(sigma) > 0 else torch.full_like(l_val, 0.5)
    if normalize:
        w = w / w.mean().clamp_min(1e-12)
    return w.float()


def load_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a finished precompute run (refuses an incomplete one)."""
    path = Path(root) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `proxykd precompute` to completion first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not manifest.get("complete"):
        raise RuntimeError(f"{root}: precompute did not finish (re-run it to resume)")
    return manifest


def load_targets(root: str | Path) -> tuple[dict[str, Any], list[TargetRow], dict[int, float]]:
    """Manifest, all rows in index order, and the dataset-level weights by sample index."""
    root = Path(root)
    manifest = load_manifest(root)
    rows = [r for name in manifest["shards"] for r in read_shard(root / name, manifest["top_k"])]
    rows.sort(key=lambda r: r.index)
    weights: dict[int, float] = {}
    if (root / WEIGHTS).exists():
        import pyarrow.parquet as pq

        t = pq.read_table(root / WEIGHTS).to_pydict()
        weights = dict(zip(t["index"], t["weight"]))
    return manifest, rows, weights
