"""Stage 2, precompute: the aligned proxy's top-k log-probs and per-sample weights, sharded and resumable."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from proxykd_fast.losses import linear_topk

from .config import PrecomputeConfig, parse_split
from .data import Example, iter_chunks, load_records, sft_batch, tokenize_records
from .dpo import sequence_log_probs
from .modeling import HiddenAndHead, check_model_matches_tokenizer, check_same_vocab, load_model, load_tokenizer
from .targets import (
    MANIFEST,
    WEIGHTS,
    TargetRow,
    read_logliks,
    shard_name,
    sigmoid_weights,
    vocab_fingerprint,
    write_shard,
)


@torch.no_grad()
def compute_rows(model: torch.nn.Module, examples: list[Example], pad_id: int, cfg: PrecomputeConfig) -> list[TargetRow]:
    """Top-k targets and answer log-likelihood of each example under the proxy."""
    wrapped = HiddenAndHead(model)
    device = next(model.parameters()).device
    rows = []
    for chunk in iter_chunks(examples, cfg.batch_size):
        b = {k: v.to(device) for k, v in sft_batch(chunk, pad_id).items()}
        hidden, w, bias = wrapped(b["input_ids"], b["attention_mask"])
        ids, lps = linear_topk(hidden, w, cfg.top_k, bias=bias, chunk_size=cfg.chunk_size, backend=cfg.backend)
        ll = sequence_log_probs(hidden, w, b["labels"], bias=bias, chunk_size=cfg.chunk_size, backend=cfg.backend)
        for r, e in enumerate(chunk):
            plen, n = len(e.prompt), len(e.answer)
            sl = slice(plen - 1, plen - 1 + n)
            rows.append(TargetRow(e.index, e.prompt + e.answer, plen, ids[r, sl].cpu().numpy(),
                                  lps[r, sl].float().cpu().numpy(), float(ll[r]), n))
    return rows


def precompute(cfg: PrecomputeConfig) -> dict[str, Any]:
    """Write shards of top-k targets (skipping shards already written), then the weights and manifest."""
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.tokenizer or cfg.proxy)
    if cfg.tokenizer:
        check_same_vocab(load_tokenizer(cfg.proxy), tok, ("proxy", "student"))
    model = load_model(cfg.proxy, cfg.dtype)
    check_model_matches_tokenizer(model, tok, "proxy")
    if torch.cuda.is_available():
        model = model.cuda()
    model.eval()
    records = load_records(cfg.data)
    out = Path(cfg.output_dir)  # created only once the inputs have loaded
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = parse_split(cfg.split, len(records))
    n = hi - lo
    n_shards = (n + cfg.shard_size - 1) // cfg.shard_size
    from tqdm.auto import tqdm

    written = skipped = 0
    names = []
    for s in tqdm(range(n_shards), desc="precompute", disable=not cfg.progress, leave=False):
        name = shard_name(s, cfg.format)
        names.append(name)
        if (out / name).exists():
            skipped += 1
            continue
        a, b = lo + s * cfg.shard_size, min(hi, lo + (s + 1) * cfg.shard_size)
        examples = tokenize_records(records[a:b], tok, cfg.max_length, start_index=a - lo)
        write_shard(out / name, compute_rows(model, examples, tok.pad_token_id, cfg), cfg.top_k, cfg.format)
        written += 1
    # Second pass: only the log-likelihood columns, for the weight statistics.
    idx, ll, nt = (np.concatenate(x) for x in zip(*(read_logliks(out / name) for name in names)))
    weights = sigmoid_weights(torch.from_numpy(ll), torch.from_numpy(nt.astype(np.int64)), cfg.loglik,
                              cfg.normalize_weights)
    pq.write_table(pa.table({"index": idx, "loglik": ll, "n_tokens": nt, "weight": weights.numpy()}), out / WEIGHTS)
    lv = ll / np.maximum(nt, 1) if cfg.loglik == "mean" else ll
    manifest = {
        "complete": True, "format": cfg.format, "top_k": cfg.top_k, "num_samples": int(n), "shards": names,
        "proxy": cfg.proxy, "vocab_size": len(tok), "vocab_fingerprint": vocab_fingerprint(tok),
        "weight_stats": cfg.weight_stats, "loglik": cfg.loglik, "normalize_weights": cfg.normalize_weights,
        "loglik_mean": float(lv.mean()), "loglik_std": float(lv.std()), "weight_mean": float(weights.mean()),
        "data": str(cfg.data), "split": cfg.split,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return {**manifest, "written": written, "skipped": skipped, "seconds": time.perf_counter() - t0}
