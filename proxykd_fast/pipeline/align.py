"""Stage 1, align-proxy: SFT warm-up on teacher answers, then K rounds of NLL + DPO vs proxy samples.

Each phase (sft/, round-N/) is a `train` run with its own checkpoints and metrics; a finished phase
leaves a verified marker (`checkpoint.finish_phase`: final weights and summary) that a resumed run
loads instead of training it again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from proxykd_fast.losses import dpo_loss, linear_cross_entropy, sequence_log_probs

from .bootstrap import notice, open_run, start_stage
from .chat import stop_token_ids
from .checkpoint import finish_phase, finished_phase
from .config import AlignProxyConfig, parse_split
from .data import (
    Example,
    count_tokens,
    iter_chunks,
    left_padded_prompts,
    load_records,
    preference_batch,
    sft_batch,
    tokenize_records,
)
from .distributed import shard_map
from .evaluate import heldout_nll
from .modeling import PipelineError, apply_lora, check_model_matches_tokenizer, load_model, load_tokenizer, save_model
from .scoring import Head, score_batches
from .trainer import TrainResult, total_steps, train

RUN_INFO = "align_run.json"
RANK_SEED_STRIDE = 7919  # rank r samples with seed + r * stride (rank 0: the single-process seed)


def sft_loss_fn(chunk_size: int | None, backend: str) -> Any:
    """Summed NLL of the answer tokens (the trainer divides by the global token count)."""

    def loss_fn(wrapped: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        hidden, w, b = wrapped(batch["input_ids"], batch["attention_mask"])
        loss = linear_cross_entropy(hidden, w, batch["labels"], bias=b, reduction="sum", chunk_size=chunk_size,
                                    backend=backend)
        return loss, {"nll": float(loss.detach()) / max(count_tokens(batch), 1)}

    return loss_fn


@torch.no_grad()
def generate_rejected(
    model: nn.Module, tokenizer: Any, examples: list[Example], cfg: AlignProxyConfig, seed: int,
    progress: bool = False,
) -> list[list[int]]:
    """One sampled answer per prompt from the current proxy (batched generate), its stop token included."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, model)
    out: list[list[int]] = []
    with tqdm(total=len(examples), desc="sample rejected", disable=not progress, leave=False) as bar:
        for chunk in iter_chunks(examples, cfg.gen_batch_size):
            batch = left_padded_prompts(chunk, tokenizer.pad_token_id)
            gen = model.generate(**{k: v.to(device) for k, v in batch.items()}, do_sample=True,
                                 temperature=cfg.gen_temperature, top_p=cfg.gen_top_p, top_k=cfg.gen_top_k,
                                 max_new_tokens=cfg.gen_max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=stops)
            width = batch["input_ids"].shape[1]
            for row in gen[:, width:].tolist():
                ids: list[int] = []
                for t in row:
                    ids.append(t)
                    if t in stops:
                        break
                out.append(ids)
            bar.update(len(chunk))
    model.train(was_training)
    return out


def sample_rejected(
    model: nn.Module, tokenizer: Any, examples: list[Example], cfg: AlignProxyConfig, seed: int, acc: Any = None,
) -> list[list[int]]:
    """Rejected answers for every example; under DDP rank r samples examples[r::world] and all are gathered."""
    rank = acc.process_index if acc is not None else 0
    show = cfg.progress and (acc is None or acc.is_main_process)
    return _sharded(acc, examples, lambda part: generate_rejected(
        model, tokenizer, part, cfg, seed + RANK_SEED_STRIDE * rank, show))


def reference_logps(
    model: nn.Module, examples: list[Example], pad_id: int, cfg: AlignProxyConfig, acc: Any = None,
) -> Tensor:
    """[n, 2] summed log-probs of (chosen, rejected) under the current proxy: the reference (dpo_loss
    normalizes sums itself where the loss type needs means)."""
    show = cfg.progress and (acc is None or acc.is_main_process)

    def pair_logps(chunk: list[Example], b: dict[str, Tensor], head: Head) -> list[list[float]]:
        hidden, w, bias = head
        lp = sequence_log_probs(hidden, w, b["labels"], bias=bias, chunk_size=cfg.chunk_size,
                                backend=cfg.backend).float().cpu()
        n = len(chunk)
        return torch.stack([lp[:n], lp[n:]], dim=1).tolist()

    def score(part: list[Example]) -> list[list[float]]:
        return score_batches(model, part, lambda c: preference_batch(c, pad_id), pair_logps,
                             batch_size=cfg.per_device_eval_batch_size, desc="reference log-probs", progress=show)

    return torch.tensor(_sharded(acc, examples, score), dtype=torch.float32).view(len(examples), 2)


def _sharded(acc: Any, items: list[Any], fn: Any) -> list[Any]:
    """`shard_map` when an accelerator is given, else `fn(items)`."""
    return list(fn(items)) if acc is None else shard_map(acc, items, fn)


def dpo_loss_fn(cfg: AlignProxyConfig) -> Any:
    """Parts {"dpo": DPO summed over pairs, "nll": nll_alpha * NLL summed over chosen tokens} of a micro-batch.

    The trainer divides each part by its own global count (`dpo_count_fn`), so the objective
    mean-over-pairs DPO + nll_alpha * per-token NLL is exact under gradient accumulation and DDP.
    """

    def loss_fn(wrapped: nn.Module, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, float]]:
        hidden, w, b = wrapped(batch["input_ids"], batch["attention_mask"])
        ref = batch["ref_logps"]
        pairs = ref.shape[0]
        ref_flat = torch.cat([ref[:, 0], ref[:, 1]]).to(hidden.device)
        loss, metrics = dpo_loss(hidden, w, batch["labels"], ref_logps=ref_flat, beta=cfg.beta,
                                 loss_type=cfg.dpo_loss_type, nll_alpha=0.0, average_log_prob=cfg.average_log_prob,
                                 label_smoothing=cfg.label_smoothing, bias=b, chunk_size=cfg.chunk_size,
                                 backend=cfg.backend)
        parts = {"dpo": loss * pairs}
        if cfg.nll_alpha:
            nll = linear_cross_entropy(hidden[:pairs], w, batch["labels"][:pairs], bias=b, reduction="sum",
                                       chunk_size=cfg.chunk_size, backend=cfg.backend)
            parts["nll"] = cfg.nll_alpha * nll
        return parts, {k: float(v) for k, v in metrics.items()}

    return loss_fn


def dpo_count_fn(cfg: AlignProxyConfig) -> Any:
    """The normalisers of `dpo_loss_fn`'s parts: pairs, and chosen tokens when nll_alpha > 0."""

    def count(batch: dict[str, Any]) -> dict[str, int]:
        pairs = int(batch["ref_logps"].shape[0])
        counts = {"dpo": pairs}
        if cfg.nll_alpha:
            counts["nll"] = count_tokens(batch, rows=pairs)
        return counts

    return count


@dataclass
class _Run:
    """What every phase of one align-proxy run shares."""

    cfg: AlignProxyConfig
    acc: Any
    tok: Any
    model: nn.Module
    out: Path
    resume: bool
    eval_fn: Callable[[nn.Module], float] | None

    def global_batch(self) -> int:
        """Samples per optimizer step over all processes."""
        return self.cfg.per_device_train_batch_size * self.cfg.gradient_accumulation_steps * self.acc.num_processes

    def held_out(self) -> float | None:
        """The held-out NLL of the current model, or None without --eval-data."""
        return self.eval_fn(self.model) if self.eval_fn is not None else None


def _phase(run: _Run, name: str, body: Callable[[Path], tuple[TrainResult, dict[str, Any]]],
           ) -> tuple[dict[str, Any] | None, int]:
    """(summary, steps) of a finished phase (loading its final weights), or of training it with `body`; the
    summary is None when the phase stopped unfinished (--max-steps-this-run)."""
    pdir = run.out / name
    done = finished_phase(pdir, report=lambda msg: notice(run.acc, f"[align-proxy] {msg}"))
    if done is not None:
        info, weights = done
        run.model.load_state_dict(weights)
        return info, int(info["steps"])
    pdir.mkdir(parents=True, exist_ok=True)
    res, info = body(pdir)
    if not res.finished:
        return None, res.steps
    if run.acc.is_main_process:
        finish_phase(pdir, run.model, info)
    run.acc.wait_for_everyone()
    return info, res.steps


def _sft(run: _Run, warm: list[Example]) -> Callable[[Path], tuple[TrainResult, dict[str, Any]]]:
    """The SFT warm-up phase on the teacher answers of the warm-up split."""
    cfg, pad = run.cfg, run.tok.pad_token_id

    def body(pdir: Path) -> tuple[TrainResult, dict[str, Any]]:
        steps = total_steps(cfg, len(warm), run.global_batch(), epochs=cfg.warmup_epochs, steps=cfg.warmup_steps_sft)
        res = train(cfg, run.model, n_train=len(warm), make_batch=lambda idx: sft_batch([warm[i] for i in idx], pad),
                    count_items=count_tokens, loss_fn=sft_loss_fn(cfg.chunk_size, cfg.backend), out_dir=pdir,
                    steps=steps, eval_fn=run.eval_fn, accelerator=run.acc, desc="proxy-sft", resume=run.resume)
        return res, {"phase": "sft", "steps": res.steps, "eval_nll": run.held_out() if res.finished else None}

    return body


def _dpo_round(run: _Run, r: int, align: list[Example], best: float | None,
               ) -> Callable[[Path], tuple[TrainResult, dict[str, Any]]]:
    """DPO round r: rejected answers (sampled, or the dataset's in round 1 with --dataset-rejected first_round), the
    proxy at the round's start as the frozen reference, NLL + DPO; a round that raised the held-out NLL is reverted."""
    cfg, acc, model, pad = run.cfg, run.acc, run.model, run.tok.pad_token_id

    def body(pdir: Path) -> tuple[TrainResult, dict[str, Any]]:
        start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rejected = _rejected(run, r, align, pdir / "rejected.json")
        pairs = [dataclasses.replace(e, rejected=rj) for e, rj in zip(align, rejected)]
        ref = reference_logps(model, pairs, pad, cfg, acc=acc)

        def make_batch(idx: list[int]) -> dict[str, Any]:
            b: dict[str, Any] = preference_batch([pairs[i] for i in idx], pad)
            b["ref_logps"] = ref[idx]
            return b

        steps = total_steps(cfg, len(pairs), run.global_batch(), epochs=cfg.round_epochs, steps=cfg.round_steps)
        round_cfg = dataclasses.replace(cfg, learning_rate=cfg.round_learning_rate or cfg.learning_rate)
        res = train(round_cfg, model, n_train=len(pairs), make_batch=make_batch, count_items=dpo_count_fn(cfg),
                    loss_fn=dpo_loss_fn(cfg), out_dir=pdir, steps=steps, eval_fn=run.eval_fn, accelerator=acc,
                    desc=f"proxy-dpo-{r}", resume=run.resume, allow_fresh=True)
        if not res.finished:
            return res, {}
        value = run.held_out()
        kept = cfg.keep_round_if_worse or value is None or best is None or value <= best
        if not kept:
            model.load_state_dict(start_state)
            notice(acc, f"[align-proxy] round {r} raised held-out NLL ({value:.4f} > {best:.4f}): reverted and "
                        "stopped")
        last = res.history[-1] if res.history else {}
        return res, {"phase": f"round-{r}", "steps": res.steps, "eval_nll": value, "kept": kept,
                     "last": {k: v for k, v in last.items() if "/" in k}}

    return body


def _rejected(run: _Run, r: int, align: list[Example], path: Path) -> list[list[int]]:
    """Round r's rejected answers: stored from an interrupted attempt, the dataset's (round 1, first_round), or
    sampled from the current proxy; written atomically so a resume reuses exactly these."""
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(stored, list) and len(stored) == len(align):
            return stored
        notice(run.acc, f"[align-proxy] {path} does not hold {len(align)} answers: sampling them again")
    if r == 1 and run.cfg.dataset_rejected == "first_round":
        rejected = [list(e.rejected or []) for e in align]
    else:
        rejected = sample_rejected(run.model, run.tok, align, run.cfg, seed=run.cfg.seed * 1000 + r, acc=run.acc)
    if run.acc.is_main_process:
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(rejected), encoding="utf-8")
        os.replace(tmp, path)
    return rejected


def _check_data(cfg: AlignProxyConfig, warm: list[Example], align: list[Example]) -> None:
    """Refuse data the rounds cannot use as asked: text records (no prompts), or a rejected column not asked for."""
    if cfg.rounds and any(e.language_modeling for e in align):
        raise PipelineError("align-proxy's DPO rounds sample answers to prompts, and language-modeling ('text') "
                            "records have none: use prompt/completion or messages data, or --rounds 0")
    with_rejected = sum(e.rejected is not None for e in warm + align)
    if cfg.dataset_rejected == "refuse" and with_rejected:
        raise PipelineError(
            f"--data has rejected answers ({with_rejected} of {len(warm) + len(align)} records in the warm-up and "
            "alignment splits), which align-proxy does not use by default: every round samples its own from the "
            "current proxy. Pass --dataset-rejected first_round to train round 1 on the dataset's rejected answers "
            "(later rounds sample), or --dataset-rejected ignore to sample in every round")
    if cfg.dataset_rejected == "first_round" and cfg.rounds:
        missing = sum(e.rejected is None for e in align)
        if missing:
            raise PipelineError(f"--dataset-rejected first_round: {missing} of {len(align)} records of the alignment "
                                "split have no rejected answer")


def align_proxy(cfg: AlignProxyConfig, accelerator: Any = None) -> dict[str, Any]:
    """Run the proxy alignment; the aligned proxy is saved (loadable by from_pretrained) in output_dir."""
    acc = start_stage(cfg, accelerator)
    tok = load_tokenizer(cfg.proxy)
    model = load_model(cfg.proxy, cfg.dtype)
    check_model_matches_tokenizer(model, tok, "proxy")
    model = apply_lora(model, cfg.lora).to(acc.device)
    examples = tokenize_records(load_records(cfg.data), tok, cfg.max_length)
    warm = examples[slice(*parse_split(cfg.warmup_split, len(examples)))]
    align = examples[slice(*parse_split(cfg.align_split, len(examples)))]
    _check_data(cfg, warm, align)
    held = tokenize_records(load_records(cfg.eval_data), tok, cfg.max_length) if cfg.eval_data else []
    out = Path(cfg.output_dir)  # touched only once the inputs have loaded
    phases = [out / "sft", *(p for p in out.glob("round-*") if p.is_dir())]
    resume = open_run(cfg, acc, stage="align-proxy", out=out, record=RUN_INFO,
                      clear=[*phases, out / "align_summary.json"], config_name="align_config.yaml")

    def eval_fn(m: nn.Module) -> float:
        return heldout_nll(m, held, tok.pad_token_id, cfg.per_device_eval_batch_size, cfg.chunk_size, cfg.backend)

    run = _Run(cfg, acc, tok, model, out, resume, eval_fn if held else None)
    summary: dict[str, Any] = {"phases": [], "initial_eval_nll": run.held_out()}
    info, steps = _phase(run, "sft", _sft(run, warm))
    if info is None:
        return {"finished": False, "phase": "sft", "steps": steps}
    summary["phases"].append(info)
    best = info["eval_nll"]
    for r in range(1, cfg.rounds + 1):
        info, steps = _phase(run, f"round-{r}", _dpo_round(run, r, align, best))
        if info is None:
            return {"finished": False, "phase": f"round-{r}", "steps": steps}
        summary["phases"].append(info)
        if not info.get("kept", True):
            break
        best = info["eval_nll"]
    summary["final_eval_nll"] = best
    summary["finished"] = True
    if acc.is_main_process:
        save_model(model, tok, str(out))
        (out / "align_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    acc.wait_for_everyone()
    return summary


__all__ = ["align_proxy", "count_tokens", "dpo_count_fn", "dpo_loss_fn", "reference_logps", "sample_rejected",
           "sft_loss_fn"]
