"""Evaluation: held-out NLL of teacher answers, token-level KL to a reference model, samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from proxykd_fast.losses import linear_cross_entropy, proxy_kd_loss

from .chat import stop_token_ids
from .config import EvalConfig, parse_split
from .data import Example, count_tokens, left_padded_prompts, load_records, sft_batch, tokenize_records
from .modeling import check_same_vocab, load_model, load_tokenizer
from .scoring import Head, score_batches


def heldout_nll(
    model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 32,
    chunk_size: int | None = None, backend: str = "auto", progress: bool = False,
) -> float:
    """Mean per-token NLL of the answers of `examples` under `model` (teacher-forced)."""

    def nll(chunk: list[Example], b: dict[str, Tensor], head: Head) -> list[tuple[float, int]]:
        hidden, w, bias = head
        total = linear_cross_entropy(hidden, w, b["labels"], bias=bias, reduction="sum", chunk_size=chunk_size,
                                     backend=backend)
        return [(float(total), count_tokens(b))]

    sums = score_batches(model, examples, lambda c: sft_batch(c, pad_id), nll, batch_size=batch_size,
                         desc="held-out NLL", progress=progress)
    return sum(t for t, _ in sums) / max(sum(n for _, n in sums), 1)


def heldout_kl(
    model: nn.Module, reference: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 32,
    chunk_size: int | None = None, backend: str = "auto", progress: bool = False,
) -> dict[str, float]:
    """Mean per-token KL(reference || model) and NLL on the answers, from the fused KD loss."""

    def kl(chunk: list[Example], b: dict[str, Tensor], student: Head, ref: Head) -> list[tuple[float, float, int]]:
        (sh, sw, sb), (rh, rw, rb) = student, ref
        _, comp = proxy_kd_loss(sh, sw, b["labels"], proxy_hidden=rh, proxy_weight=rw, proxy_bias=rb, student_bias=sb,
                                alpha=1.0, reduction="sum", return_components=True, chunk_size=chunk_size,
                                backend=backend)
        return [(float(comp["nll"]), float(comp["kd"]), int(comp["valid_tokens"]))]

    sums = score_batches([model, reference], examples, lambda c: sft_batch(c, pad_id), kl, batch_size=batch_size,
                         desc="held-out KL", progress=progress)
    count = sum(n for _, _, n in sums)
    return {"nll": sum(x for x, _, _ in sums) / max(count, 1), "kl": sum(x for _, x, _ in sums) / max(count, 1),
            "tokens": count}


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


def evaluate(cfg: EvalConfig, accelerator: Any = None) -> dict[str, Any]:
    """Run the evaluation of `cfg.model` on `cfg.data`; write JSON to `cfg.output` when set.

    Under several processes only the main one evaluates (the others wait and return its device only).
    """
    from .bootstrap import make_accelerator

    acc = accelerator or make_accelerator()
    device = acc.device
    result: dict[str, Any] = {"model": cfg.model, "data": cfg.data, "device": str(device)}
    if acc.is_main_process:
        result.update(_evaluate(cfg, device))
        if cfg.output:
            Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    acc.wait_for_everyone()
    return result


def _evaluate(cfg: EvalConfig, device: torch.device) -> dict[str, Any]:
    """The evaluation itself, on one device."""
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.dtype).to(device)
    records = load_records(cfg.data)
    lo, hi = parse_split(cfg.split, len(records))
    examples = tokenize_records(records[lo:hi], tok, cfg.max_length)
    result: dict[str, Any] = {"samples_evaluated": len(examples)}
    bs = cfg.per_device_eval_batch_size
    if cfg.reference:
        ref = load_model(cfg.reference, cfg.dtype).to(device)
        check_same_vocab(ref, model, ("reference", "model"))
        result.update(heldout_kl(model, ref, examples, tok.pad_token_id, bs, cfg.chunk_size, cfg.backend,
                                 progress=cfg.progress))
    else:
        result["nll"] = heldout_nll(model, examples, tok.pad_token_id, bs, cfg.chunk_size, cfg.backend,
                                    progress=cfg.progress)
    result["generations"] = generation_samples(model, tok, examples[: cfg.num_samples], cfg.max_new_tokens)
    return result
