"""Stage 3, distill: NLL + alpha * w * KL(proxy || student) on offline top-k targets or an online proxy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from proxykd_fast.losses import linear_cross_entropy, proxy_kd_loss, sequence_log_probs

from .bootstrap import open_run, start_stage
from .config import DistillConfig, parse_split
from .data import IGNORE, Example, count_tokens, load_records, pad_batch, tokenize_records
from .distributed import shard_map
from .evaluate import heldout_nll
from .modeling import (
    HiddenAndHead,
    PipelineError,
    apply_lora,
    check_model_matches_tokenizer,
    check_same_vocab,
    load_model,
    load_tokenizer,
    save_model,
    vocab_size,
)
from .scoring import Head, score_batches
from .targets import TargetRow, load_targets, sigmoid_weights, vocab_fingerprint
from .trainer import total_steps, train

RUN_INFO = "distill_run.json"


def offline_batch(rows: list[TargetRow], weights: dict[int, float], pad_id: int, k: int, cfg: DistillConfig) -> dict:
    """Padded batch with [B, T, k] top-k targets aligned to the shifted labels, and sample weights."""
    b: dict[str, Any] = pad_batch([r.input_ids for r in rows], [r.prompt_len for r in rows], pad_id)
    bsz, width = b["input_ids"].shape
    ids = torch.arange(k).expand(bsz, width, k).clone()
    lps = torch.full((bsz, width, k), -float(torch.log(torch.tensor(float(k)))))
    for i, r in enumerate(rows):
        s = r.prompt_len - 1
        ids[i, s : s + r.n_tokens] = torch.from_numpy(r.topk_ids)
        lps[i, s : s + r.n_tokens] = torch.from_numpy(r.topk_logprobs)
    b["topk_ids"], b["topk_logprobs"] = ids, lps
    if cfg.weight_stats == "batch":
        w = sigmoid_weights(torch.tensor([r.loglik for r in rows]), torch.tensor([r.n_tokens for r in rows]),
                            cfg.loglik, cfg.normalize_weights)
    else:
        w = torch.tensor([weights.get(r.index, 1.0) for r in rows], dtype=torch.float32)
    b["sample_weight"] = w
    return b


def kd_loss_fn(cfg: DistillConfig, proxy: nn.Module | None) -> Any:
    """Summed NLL + alpha * w * D(proxy, student) over the answer tokens (the trainer normalizes by the global count).

    The weights w come from the batch ("sample_weight": dataset statistics, precomputed) or, with an
    online proxy and weight_stats="batch", from the proxy's log-likelihoods of this micro-batch.
    """
    proxy_wrap = HiddenAndHead(proxy) if proxy is not None else None

    def loss_fn(wrapped: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        hidden, w, b = wrapped(batch["input_ids"], batch["attention_mask"])
        if cfg.alpha == 0:
            loss = linear_cross_entropy(hidden, w, batch["labels"], bias=b, reduction="sum",
                                        chunk_size=cfg.chunk_size, backend=cfg.backend)
            n = max(count_tokens(batch), 1)
            return loss, {"nll": float(loss.detach()) / n, "kd": 0.0, "weight_mean": 1.0}
        kw: dict[str, Any] = {}
        weight = batch.get("sample_weight") if cfg.use_weights else None
        if proxy_wrap is not None:
            with torch.no_grad():
                ph, pw, pb = proxy_wrap(batch["input_ids"], batch["attention_mask"])
                if cfg.use_weights and weight is None:
                    ll = sequence_log_probs(ph, pw, batch["labels"], bias=pb, chunk_size=cfg.chunk_size,
                                            backend=cfg.backend)
                    weight = sigmoid_weights(ll, (batch["labels"] != IGNORE).sum(-1), cfg.loglik,
                                             cfg.normalize_weights)
            kw.update(proxy_hidden=ph, proxy_weight=pw, proxy_bias=pb)
        else:
            kw.update(proxy_topk_ids=batch["topk_ids"], proxy_topk_logprobs=batch["topk_logprobs"])
        loss, comp = proxy_kd_loss(hidden, w, batch["labels"], sample_weight=weight, alpha=cfg.alpha,
                                   temperature=cfg.temperature, divergence=cfg.divergence, jsd_beta=cfg.jsd_beta,
                                   reduction="sum", student_bias=b, return_components=True,
                                   chunk_size=cfg.chunk_size, backend=cfg.backend, **kw)
        n = max(int(comp["valid_tokens"]), 1)
        metrics = {"nll": float(comp["nll"]) / n, "kd": float(comp["kd"]) / n,
                   "weight_mean": float(weight.float().mean()) if weight is not None else 1.0}
        return loss, metrics

    return loss_fn


def online_dataset_weights(proxy: nn.Module, rows: list[TargetRow], pad_id: int, cfg: DistillConfig,
                           acc: Any = None) -> dict[int, float]:
    """Dataset-level weights for an online proxy: a no-grad pass of its log-likelihoods over every training row."""
    show = cfg.progress and (acc is None or acc.is_main_process)

    def loglik(chunk: list[TargetRow], b: dict[str, Tensor], head: Head) -> list[float]:
        hidden, w, bias = head
        return sequence_log_probs(hidden, w, b["labels"], bias=bias, chunk_size=cfg.chunk_size,
                                  backend=cfg.backend).double().cpu().tolist()

    def score(part: list[TargetRow]) -> list[float]:
        return score_batches(proxy, part, lambda c: pad_batch([r.input_ids for r in c], [r.prompt_len for r in c],
                                                              pad_id),
                             loglik, batch_size=cfg.per_device_eval_batch_size, desc="proxy log-likelihoods",
                             progress=show)

    ll = shard_map(acc, rows, score) if acc is not None else score(rows)
    w = sigmoid_weights(torch.tensor(ll, dtype=torch.float64), torch.tensor([r.n_tokens for r in rows]), cfg.loglik,
                        cfg.normalize_weights)
    return {r.index: float(x) for r, x in zip(rows, w)}


def _online_rows(cfg: DistillConfig, tok: Any) -> list[TargetRow]:
    """Rows (tokens only) for online distillation from raw teacher data."""
    import numpy as np

    if not cfg.data:
        raise PipelineError("online distillation needs --data (teacher answers)")
    records = load_records(cfg.data)
    lo, hi = parse_split(cfg.split, len(records))
    empty = np.zeros((0, 0))
    return [TargetRow(e.index, e.prompt + e.answer, len(e.prompt), empty, empty, 0.0, len(e.answer))
            for e in tokenize_records(records[lo:hi], tok, cfg.max_length)]


def distill(cfg: DistillConfig, accelerator: Any = None) -> dict[str, Any]:
    """Train the student; the final student is saved (loadable by from_pretrained) in output_dir."""
    acc = start_stage(cfg, accelerator)
    tok = load_tokenizer(cfg.student)
    student = load_model(cfg.student, cfg.dtype)
    check_model_matches_tokenizer(student, tok, "student")
    proxy = None
    weights: dict[int, float] = {}
    if cfg.targets and not cfg.proxy:
        rows, weights, k = _offline_rows(cfg, tok)
    elif cfg.proxy:
        check_same_vocab(load_tokenizer(cfg.proxy), tok, ("proxy", "student"))
        proxy = load_model(cfg.proxy, cfg.dtype).to(acc.device).eval()
        for p in proxy.parameters():
            p.requires_grad_(False)
        if vocab_size(proxy) != vocab_size(student):
            raise PipelineError(f"proxy head has {vocab_size(proxy)} rows, student head {vocab_size(student)}")
        rows = _online_rows(cfg, tok)
        k = 0  # the online proxy gives its full distribution
    elif cfg.alpha == 0 and cfg.data:
        rows = _online_rows(cfg, tok)
        k = 0
    else:
        raise PipelineError("distill needs --targets (offline) or --proxy (online), or --alpha 0 with --data")
    if cfg.divergence != "forward_kl" and cfg.alpha != 0 and proxy is None:
        raise PipelineError(
            f"divergence={cfg.divergence!r} needs the proxy's full distribution: use an online --proxy; offline "
            "top-k targets support only divergence='forward_kl'"
        )
    student = apply_lora(student, cfg.lora).to(acc.device)
    held = tokenize_records(load_records(cfg.eval_data), tok, cfg.max_length) if cfg.eval_data else []
    pad = tok.pad_token_id
    out = Path(cfg.output_dir)  # touched only once the inputs have loaded
    resume = open_run(cfg, acc, stage="distill", out=out, record=RUN_INFO, clear=[out / "distill_summary.json"],
                      config_name="distill_config.yaml")  # checkpoints and metrics are cleared by the trainer
    if proxy is not None and cfg.alpha != 0 and cfg.use_weights and cfg.weight_stats == "dataset":
        weights = online_dataset_weights(proxy, rows, pad, cfg, acc)
    offline = proxy is None and cfg.alpha != 0 and cfg.targets

    def make_batch(idx: list[int]) -> dict[str, Any]:
        chosen = [rows[i] for i in idx]
        if offline:
            return offline_batch(chosen, weights, pad, k, cfg)
        b: dict[str, Any] = pad_batch([r.input_ids for r in chosen], [r.prompt_len for r in chosen], pad)
        if weights:
            b["sample_weight"] = torch.tensor([weights[r.index] for r in chosen], dtype=torch.float32)
        return b

    def eval_fn(m: nn.Module) -> float:
        return heldout_nll(m, held, pad, cfg.per_device_eval_batch_size, cfg.chunk_size, cfg.backend)

    steps = total_steps(cfg, len(rows), cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
                        * acc.num_processes)
    res = train(cfg, student, n_train=len(rows), make_batch=make_batch, count_items=count_tokens,
                loss_fn=kd_loss_fn(cfg, proxy), out_dir=out, steps=steps, eval_fn=eval_fn if held else None,
                accelerator=acc, desc="distill", resume=resume)
    summary = {"finished": res.finished, "steps": res.steps, "best_eval_nll": res.best_eval,
               "final_eval_nll": eval_fn(student) if (held and res.finished) else None}
    if res.finished and acc.is_main_process:
        save_model(student, tok, str(out))
        (out / "distill_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    acc.wait_for_everyone()
    return summary


def _offline_rows(cfg: DistillConfig, tok: Any) -> tuple[list[TargetRow], dict[int, float], int]:
    """Rows, dataset weights (recomputed when the loglik settings differ from precompute's) and k of --targets."""
    manifest, rows, weights = load_targets(cfg.targets)
    if manifest["vocab_fingerprint"] != vocab_fingerprint(tok) or manifest["vocab_size"] != len(tok):
        raise PipelineError(
            f"the targets in {cfg.targets} were made with another vocabulary ({manifest['vocab_size']} tokens, "
            f"fingerprint {manifest['vocab_fingerprint']}) than the student's tokenizer ({len(tok)} tokens, "
            f"{vocab_fingerprint(tok)}): Proxy-KD needs one shared vocabulary"
        )
    if cfg.use_weights and cfg.weight_stats == "dataset" and (
            manifest["loglik"] != cfg.loglik or manifest["normalize_weights"] != cfg.normalize_weights):
        w = sigmoid_weights(torch.tensor([r.loglik for r in rows]), torch.tensor([r.n_tokens for r in rows]),
                            cfg.loglik, cfg.normalize_weights)
        weights = {r.index: float(x) for r, x in zip(rows, w)}
    return rows, weights, manifest["top_k"]


__all__ = ["Example", "distill", "kd_loss_fn", "offline_batch"]
