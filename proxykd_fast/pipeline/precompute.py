"""Stage 2, precompute: the aligned proxy's top-k log-probs and per-sample weights, sharded, streaming, resumable.

Records are read shard by shard, so memory does not grow with the dataset; the weights' dataset
statistics come at the end from the per-sample log-likelihoods stored in the shards (a few numbers
per sample). Without `resume` the stage's files in output_dir are deleted first; with it, the
shards already written are kept provided the run info (proxy, data, split, top_k, ...) matches.
"""

from __future__ import annotations

import json
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from proxykd_fast.losses import linear_topk, sequence_log_probs

from .bootstrap import open_run, start_stage
from .config import PrecomputeConfig, parse_split
from .data import Example, count_records, iter_records, sft_batch, tokenize_records
from .modeling import check_model_matches_tokenizer, check_same_vocab, load_model, load_tokenizer
from .scoring import Head, score_batches
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

RUN_INFO = "precompute_run.json"
RUN_KEYS = ("proxy", "tokenizer", "data", "split", "top_k", "shard_size", "max_length", "format", "dtype")


def compute_rows(
    model: torch.nn.Module, examples: list[Example], pad_id: int, cfg: PrecomputeConfig, bar: Any = None,
) -> list[TargetRow]:
    """Top-k targets and answer log-likelihood of each example under the proxy."""

    def targets(chunk: list[Example], b: dict[str, Tensor], head: Head) -> list[TargetRow]:
        hidden, w, bias = head
        ids, lps = linear_topk(hidden, w, cfg.top_k, bias=bias, chunk_size=cfg.chunk_size, backend=cfg.backend)
        ll = sequence_log_probs(hidden, w, b["labels"], bias=bias, chunk_size=cfg.chunk_size, backend=cfg.backend)
        rows = []
        for r, e in enumerate(chunk):
            plen, n = len(e.prompt), len(e.answer)
            sl = slice(plen - 1, plen - 1 + n)
            rows.append(TargetRow(e.index, e.prompt + e.answer, plen, ids[r, sl].cpu().numpy(),
                                  lps[r, sl].float().cpu().numpy(), float(ll[r]), n))
        return rows

    return score_batches(model, examples, lambda c: sft_batch(c, pad_id), targets,
                         batch_size=cfg.per_device_eval_batch_size, desc="precompute", bar=bar)


def _stage_files(out: Path) -> list[Path]:
    """The files a precompute run writes in its output dir."""
    names = [MANIFEST, WEIGHTS, RUN_INFO]
    return [out / n for n in names] + sorted(out.glob("shard-*.parquet")) + sorted(out.glob("shard-*.safetensors")) \
        + sorted(out.glob(".shard-*.tmp"))


def precompute(cfg: PrecomputeConfig, accelerator: Any = None) -> dict[str, Any]:
    """Write shards of top-k targets (with `resume`, skipping shards already written), then the weights and manifest.

    Under several processes only the main one computes (the others wait and return an empty dict).
    """
    acc = start_stage(cfg, accelerator)
    result: dict[str, Any] = {}
    if acc.is_main_process:
        result = _precompute(cfg, acc)
    acc.wait_for_everyone()
    return result


def _precompute(cfg: PrecomputeConfig, acc: Any) -> dict[str, Any]:
    """The precompute run itself, on the main process."""
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.tokenizer or cfg.proxy)
    if cfg.tokenizer:
        check_same_vocab(load_tokenizer(cfg.proxy), tok, ("proxy", "student"))
    model = load_model(cfg.proxy, cfg.dtype)
    check_model_matches_tokenizer(model, tok, "proxy")
    model = model.to(acc.device).eval()
    total = count_records(cfg.data)  # a streaming pass: only the count is kept
    lo, hi = parse_split(cfg.split, total)
    out = Path(cfg.output_dir)  # created only once the inputs have loaded
    open_run(cfg, acc, stage="precompute", out=out, record=RUN_INFO, clear=_stage_files(out), identity_keys=RUN_KEYS,
             sync=False)  # the other processes wait at the end
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest marks a complete run: rewritten at the end
    n = hi - lo
    n_shards = (n + cfg.shard_size - 1) // cfg.shard_size
    from tqdm.auto import tqdm

    written = skipped = 0
    names = []
    stream = islice(iter_records(cfg.data), lo, hi)
    with tqdm(total=n, desc="precompute", disable=not cfg.progress, leave=False) as bar:
        for s in range(n_shards):
            name = shard_name(s, cfg.format)
            names.append(name)
            start = s * cfg.shard_size
            records = list(islice(stream, cfg.shard_size))
            if (out / name).exists():
                skipped += 1
                bar.update(len(records))
                continue
            examples = tokenize_records(records, tok, cfg.max_length, start_index=start)
            write_shard(out / name, compute_rows(model, examples, tok.pad_token_id, cfg, bar), cfg.top_k, cfg.format)
            written += 1
    # Weight statistics from the stored log-likelihood columns only.
    idx, ll, nt = (np.concatenate(x) for x in zip(*(read_logliks(out / name) for name in names)))
    weights = sigmoid_weights(torch.from_numpy(ll), torch.from_numpy(nt.astype(np.int64)), cfg.loglik,
                              cfg.normalize_weights)
    pq.write_table(pa.table({"index": idx, "loglik": ll, "n_tokens": nt, "weight": weights.numpy()}), out / WEIGHTS)
    lv = ll / np.maximum(nt, 1) if cfg.loglik == "mean" else ll
    manifest = {
        "complete": True, "format": cfg.format, "top_k": cfg.top_k, "num_samples": int(n), "shards": names,
        "proxy": cfg.proxy, "vocab_size": len(tok), "vocab_fingerprint": vocab_fingerprint(tok),
        "loglik": cfg.loglik, "normalize_weights": cfg.normalize_weights,
        "loglik_mean": float(lv.mean()), "loglik_std": float(lv.std()), "weight_mean": float(weights.mean()),
        "data": str(cfg.data), "split": cfg.split,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return {**manifest, "written": written, "skipped": skipped, "seconds": time.perf_counter() - t0}

