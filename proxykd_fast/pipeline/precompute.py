"""Stage 2, precompute: the aligned proxy's top-k log-probs and per-sample weights, sharded, streaming, resumable.

Records are read shard by shard, so memory does not grow with the dataset; under several processes
each scores its share of a shard's batches (FSDP-sharded with --fsdp) and the main process writes.
The weights' dataset statistics come at the end from the per-sample log-likelihoods stored in the
shards (a few numbers per sample). Without `resume` the stage's files in output_dir are deleted first; with it, the
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

from . import faults
from .bootstrap import open_run, start_stage
from .config import PrecomputeConfig, parse_split
from .data import Example, count_records, iter_records, sft_batch, tokenize_records
from .modeling import PipelineError, check_model_matches_tokenizer, check_same_vocab, load_tokenizer
from .scoring import Head, score_batches
from .sharding import broadcast_object, local_view, prepare_model
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
RUN_KEYS = ("proxy", "tokenizer", "data", "split", "top_k", "shard_size", "max_length", "format", "dtype", "prior",
            "posterior", "prior_strength", "prior_mix", "posterior_fit_data", "posterior_fit_samples",
            "mixed_precision", "attn_implementation", "packing")


def compute_rows(
    model: torch.nn.Module, examples: list[Example], pad_id: int, cfg: PrecomputeConfig, bar: Any = None,
    posterior: Any = None, acc: Any = None,
) -> list[TargetRow]:
    """Top-k targets (`posterior`'s, if given) and answer log-likelihood of each example under the proxy
    (batches split over `acc`'s processes: the rows do not depend on their number)."""

    def targets(chunk: list[Example], b: dict[str, Tensor], head: Head) -> list[TargetRow]:
        hidden, w, bias = head
        ids, lps = linear_topk(hidden, w, cfg.top_k, bias=bias, chunk_size=cfg.chunk_size, backend=cfg.backend)
        if posterior is not None:
            ids, lps = posterior(hidden, w, bias, chunk, ids, lps)
        ll = sequence_log_probs(hidden, w, b["labels"], bias=bias, chunk_size=cfg.chunk_size, backend=cfg.backend)
        rows = []
        for r, e in enumerate(chunk):
            plen, n = len(e.prompt), len(e.answer)
            sl = slice(plen - 1, plen - 1 + n)
            rows.append(TargetRow(e.index, e.prompt + e.answer, plen, ids[r, sl].cpu().numpy(),
                                  lps[r, sl].float().cpu().numpy(), float(ll[r]), n))
        return rows

    return score_batches(model, examples, lambda c: sft_batch(c, pad_id), targets,
                         batch_size=cfg.per_device_eval_batch_size, desc="precompute", bar=bar, acc=acc)


def _stage_files(out: Path) -> list[Path]:
    """The files a precompute run writes in its output dir."""
    names = [MANIFEST, WEIGHTS, RUN_INFO, "posterior_fit.json"]
    return [out / n for n in names] + sorted(out.glob("shard-*.parquet")) + sorted(out.glob("shard-*.safetensors")) \
        + sorted(out.glob(".shard-*.tmp"))


def precompute(cfg: PrecomputeConfig, accelerator: Any = None) -> dict[str, Any]:
    """Write shards of top-k targets (with `resume`, skipping shards already written), then the weights and manifest.

    Under several processes every one loads the proxy (FSDP-sharded with --fsdp: a proxy too large for
    one device) and scores its share of each shard's batches; the main process writes the files, the
    same bytes as one process writes. Every process returns the result.
    """
    cfg, acc = start_stage(cfg, accelerator)
    # --prior's posterior (its strength fit included) runs on the main process alone, the others wait
    solo = bool(cfg.prior) and acc.num_processes > 1
    if cfg.prior and cfg.fsdp:
        raise PipelineError("precompute --prior does not run with --fsdp yet (the posterior fit scores the proxy on "
                            "one process): run it without --fsdp, on one process or a proxy that fits one device")
    if solo and not acc.is_main_process:
        acc.wait_for_everyone()
        return broadcast_object(None, acc)
    result = _precompute(cfg, local_view(acc) if solo else acc)
    if solo:
        acc.wait_for_everyone()
        broadcast_object(result, acc)
    return result


def _precompute(cfg: PrecomputeConfig, acc: Any) -> dict[str, Any]:
    """The run itself, on every process of `acc` (which split the batches)."""
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.tokenizer or cfg.proxy)
    if cfg.tokenizer:
        check_same_vocab(load_tokenizer(cfg.proxy), tok, ("proxy", "student"))
    model = prepare_model(cfg.proxy, cfg, acc, name="proxy", train=False,
                          check=lambda m: check_model_matches_tokenizer(m, tok, "proxy"))
    total = count_records(cfg.data)  # a streaming pass: only the count is kept
    lo, hi = parse_split(cfg.split, total)
    out = Path(cfg.output_dir)  # created only once the inputs have loaded
    open_run(cfg, acc, stage="precompute", out=out, record=RUN_INFO, clear=_stage_files(out), identity_keys=RUN_KEYS)
    if acc.is_main_process:
        (out / MANIFEST).unlink(missing_ok=True)  # the manifest marks a complete run: rewritten at the end
    n = hi - lo
    posterior = None
    if cfg.prior:  # the paper's first version: Bayesian targets (proxykd_fast.prior)
        from proxykd_fast.prior.hook import PosteriorTargets, fit_examples

        posterior = PosteriorTargets(cfg, tok, model.model, out, fit_examples(cfg, tok, lo, hi))
    n_shards = (n + cfg.shard_size - 1) // cfg.shard_size
    names = [shard_name(s, cfg.format) for s in range(n_shards)]
    # The main process decides which shards exist, before any is written, so every process skips alike.
    done = broadcast_object([(out / name).exists() for name in names] if acc.is_main_process else None, acc)
    from tqdm.auto import tqdm

    written = skipped = 0
    stream = islice(iter_records(cfg.data), lo, hi)
    show = cfg.progress and acc.is_main_process
    with tqdm(total=n, desc="precompute", disable=not show, leave=False) as bar:
        for s, name in enumerate(names):
            start = s * cfg.shard_size
            records = list(islice(stream, cfg.shard_size))
            if done[s]:
                skipped += 1
                bar.update(len(records))
                continue
            examples = tokenize_records(records, tok, cfg.max_length, start_index=start)
            rows = compute_rows(model, examples, tok.pad_token_id, cfg, bar, posterior, acc=acc)
            if acc.is_main_process:
                write_shard(out / name, rows, cfg.top_k, cfg.format)
            written += 1
            acc.wait_for_everyone()  # past this point shard s is on disk, on every process
            faults.after_checkpoint("precompute", s + 1)
    result = _finish(cfg, out, names, n, tok, posterior) if acc.is_main_process else None
    acc.wait_for_everyone()
    result = broadcast_object(result, acc)
    result = {**result, "written": written, "skipped": skipped, "seconds": time.perf_counter() - t0}
    if posterior is not None:
        result["posterior_timing"] = posterior.timing()
    return result


def _finish(cfg: PrecomputeConfig, out: Path, names: list[str], n: int, tok: Any, posterior: Any) -> dict[str, Any]:
    """The weights (dataset statistics from the shards' stored log-likelihoods only) and the manifest."""
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
    if posterior is not None:
        manifest["posterior"] = posterior.summary()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest
