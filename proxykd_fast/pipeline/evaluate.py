"""Evaluation: held-out NLL of teacher answers, token-level KL to a reference model, samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from proxykd_fast.losses import linear_cross_entropy, proxy_kd_loss

from .chat import stop_token_ids
from .config import EvalConfig, parse_split
from .data import Example, iter_chunks, left_padded_prompts, load_records, sft_batch, tokenize_records
from .modeling import HiddenAndHead, check_same_vocab, load_model, load_tokenizer


def default_device() -> torch.device:
    """The accelerator when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _chunks(examples: list[Example], batch_size: int, desc: str, progress: bool) -> Any:
    """Batches of examples, with a tqdm bar counting examples when `progress`."""
    from tqdm.auto import tqdm

    with tqdm(total=len(examples), desc=desc, disable=not progress, leave=False) as bar:
        for chunk in iter_chunks(examples, batch_size):
            yield chunk
            bar.update(len(chunk))


@torch.no_grad()
def heldout_nll(
    model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 32,
    chunk_size: int | None = None, backend: str = "auto", progress: bool = False,
) -> float:
    """Mean per-token NLL of the answers of `examples` under `model` (teacher-forced)."""
    was_training = model.training
    model.eval()
    wrapped = HiddenAndHead(model)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for chunk in _chunks(examples, batch_size, "held-out NLL", progress):
        b = {k: v.to(device) for k, v in sft_batch(chunk, pad_id).items()}
        hidden, w, bias = wrapped(b["input_ids"], b["attention_mask"])
        total += float(linear_cross_entropy(hidden, w, b["labels"], bias=bias, reduction="sum",
                                            chunk_size=chunk_size, backend=backend))
        count += int((b["labels"] != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def heldout_kl(
    model: nn.Module, reference: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 32,
    chunk_size: int | None = None, backend: str = "auto", progress: bool = False,
) -> dict[str, float]:
    """Mean per-token KL(reference || model) and NLL on the answers, from the fused KD loss."""
    model.eval()
    reference.eval()
    s_wrap, r_wrap = HiddenAndHead(model), HiddenAndHead(reference)
    device = next(model.parameters()).device
    nll = kl = 0.0
    count = 0
    for chunk in _chunks(examples, batch_size, "held-out KL", progress):
        b = {k: v.to(device) for k, v in sft_batch(chunk, pad_id).items()}
        sh, sw, sb = s_wrap(b["input_ids"], b["attention_mask"])
        rh, rw, rb = r_wrap(b["input_ids"], b["attention_mask"])
        _, comp = proxy_kd_loss(sh, sw, b["labels"], proxy_hidden=rh, proxy_weight=rw, proxy_bias=rb, student_bias=sb,
                                alpha=1.0, reduction="sum", return_components=True, chunk_size=chunk_size,
                                backend=backend)
        nll += float(comp["nll"])
        kl += float(comp["kd"])
        count += int(comp["valid_tokens"])
    return {"nll": nll / max(count, 1), "kl": kl / max(count, 1), "tokens": count}


@torch.no_grad()
def generation_samples(
    model: nn.Module, tokenizer: Any, examples: list[Example], max_new_tokens: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Greedy answers for a few prompts, next to the teacher's answers."""
    if not examples:
        return []
    model.eval()
    batch = left_padded_prompts(examples, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    out = model.generate(**{k: v.to(device) for k, v in batch.items()}, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=stop_token_ids(tokenizer, model))
    width = batch["input_ids"].shape[1]
    return [
        {"prompt": e.prompt_text, "teacher": tokenizer.decode(e.answer, skip_special_tokens=True),
         "model": tokenizer.decode(row[width:], skip_special_tokens=True)}
        for e, row in zip(examples, out)
    ]


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation of `cfg.model` on `cfg.data`; write JSON to `cfg.output` when set."""
    device = default_device()
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.dtype).to(device)
    records = load_records(cfg.data)
    lo, hi = parse_split(cfg.split, len(records))
    examples = tokenize_records(records[lo:hi], tok, cfg.max_length)
    result: dict[str, Any] = {"model": cfg.model, "data": cfg.data, "samples_evaluated": len(examples),
                              "device": str(device)}
    if cfg.reference:
        ref = load_model(cfg.reference, cfg.dtype).to(device)
        check_same_vocab(ref, model, ("reference", "model"))
        result.update(heldout_kl(model, ref, examples, tok.pad_token_id, cfg.batch_size, cfg.chunk_size, cfg.backend,
                                 progress=cfg.progress))
    else:
        result["nll"] = heldout_nll(model, examples, tok.pad_token_id, cfg.batch_size, cfg.chunk_size, cfg.backend,
                                    progress=cfg.progress)
    result["generations"] = generation_samples(model, tok, examples[: cfg.num_samples], cfg.max_new_tokens)
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
