"""A small resumable training loop shared by the stages: accelerate, accumulation, logging, checkpoints."""

from __future__ import annotations

import math
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .bootstrap import make_accelerator, notice
from .checkpoint import apply_checkpoint, list_checkpoints, newest_intact_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import batch_indices
from .metrics import MetricsLogger
from .modeling import HiddenAndHead, PipelineError

# A loss is one summed term normalised by one global item count, or several named parts each
# normalised by its own count: count_items(batch) -> int | {part: int} and
# loss_fn(wrapped_model, batch) -> (summed loss | {part: summed loss}, metrics averaged over the micro-batch).
Counts = int | dict[str, int]
LossParts = Tensor | dict[str, Tensor]
LossFn = Callable[[nn.Module, dict[str, Any]], tuple[LossParts, dict[str, float]]]
CountFn = Callable[[dict[str, Any]], Counts]
SINGLE = "loss"


@dataclass
class TrainResult:
    """What a training run ended with."""

    steps: int
    finished: bool
    best_eval: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def peak_memory_mb() -> float:
    """Peak GPU memory (CUDA) or peak resident memory of the process, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def total_steps(cfg: TrainConfig, n: int, global_batch: int, epochs: float | None = None, steps: int = 0) -> int:
    """Steps of a run: explicit steps, else epochs over n samples."""
    if steps > 0:
        return steps
    if cfg.max_steps > 0:
        return cfg.max_steps
    ep = cfg.num_train_epochs if epochs is None else epochs
    return max(1, math.ceil(ep * n / global_batch))


def train(
    cfg: TrainConfig,
    model: nn.Module,
    *,
    n_train: int,
    make_batch: Callable[[list[int]], dict[str, Any]],
    count_items: CountFn,
    loss_fn: LossFn,
    out_dir: str | Path,
    steps: int,
    eval_fn: Callable[[nn.Module], float] | None = None,
    accelerator: Any = None,
    desc: str = "train",
    resume: bool | None = None,
    allow_fresh: bool = False,
) -> TrainResult:
    """Train `model` in place for `steps` optimizer steps; resumable from `out_dir/checkpoints`.

    `resume` (default: the config's resume_from_checkpoint) false: the checkpoints left in `out_dir`
    by an earlier run are deleted first, so a later `--resume` can never continue a stale run. True:
    the newest intact checkpoint is restored (broken ones are reported and skipped); when there is
    none the run is refused, unless `allow_fresh` (the stage knows that starting this phase at step 0
    loses nothing) or `--resume auto`, which say so.
    """
    acc = accelerator or make_accelerator()
    resume = bool(cfg.resume_from_checkpoint) if resume is None else resume
    allow_fresh = allow_fresh or cfg.resume_from_checkpoint == "auto"
    out_dir = Path(out_dir)
    world, rank = acc.num_processes, acc.process_index
    ckpt_root = out_dir / "checkpoints"
    if not resume and acc.is_main_process:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    acc.wait_for_everyone()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    wrapped = HiddenAndHead(model, autocast=torch.bfloat16 if cfg.bf16 else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    from transformers import get_scheduler

    kind = cfg.lr_scheduler_type
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)
    if kind == "constant" and warmup > 0:  # HF's "constant" ignores warm-up steps
        kind = "constant_with_warmup"
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    prepared = acc.prepare(wrapped)
    state: dict[str, Any] = {"best_eval": None, "bad_evals": 0, "stopped_early": False}
    best_weights: dict[str, Tensor] | None = None
    step = 0
    resume_step = None
    if resume:
        ckpt = newest_intact_checkpoint(ckpt_root, report=lambda msg: notice(acc, f"[{desc}] {msg}"))
        if ckpt is not None:
            state, best_weights = apply_checkpoint(ckpt, model, optimizer, scheduler)
            step = resume_step = int(state["step"])
            notice(acc, f"[{desc}] resumed from {ckpt.path} at step {step}")
        elif allow_fresh:
            notice(acc, f"[{desc}] --resume: no checkpoint of this phase in {ckpt_root}: it starts at step 0")
        else:
            broken = len(list_checkpoints(ckpt_root))
            found = f"{broken} checkpoint(s) there, none intact" if broken else "none there"
            raise PipelineError(
                f"[{desc}] --resume: no intact checkpoint to continue from in {ckpt_root} ({found}): the interrupted "
                "run saved none (--save-steps 0, or it stopped before its first save); run without --resume (or "
                "with --resume auto) to start again from step 0")
    logger = MetricsLogger(out_dir / "metrics.jsonl", cfg.report_to, acc.is_main_process, resume_step,
                           run_config=cfg.to_dict(), run_name=desc)
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    global_batch = micro * accum * world
    history: list[dict[str, Any]] = []
    ran = 0
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=step, desc=desc, disable=not (cfg.progress and acc.is_main_process), leave=False)
    try:
        while step < steps and not state.get("stopped_early"):
            if cfg.max_steps_this_run and ran >= cfg.max_steps_this_run:
                break
            t0 = time.perf_counter()  # the step alone: eval and checkpoint time stay out of tokens_per_s
            idx = batch_indices(n_train, global_batch, step, cfg.seed)
            mine = idx[rank * micro * accum : (rank + 1) * micro * accum]
            batches = [make_batch(mine[i * micro : (i + 1) * micro]) for i in range(accum)]
            loss_total, sums, tokens = accumulate_gradients(acc, prepared, batches, count_items, loss_fn)
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            else:
                gnorm = float("nan")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            step += 1
            ran += 1
            bar.update(1)
            row = {"step": step, "loss": loss_total, **sums,
                   "grad_norm": gnorm, "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": tokens / max(elapsed, 1e-9), "peak_memory_mb": peak_memory_mb()}
            if eval_fn is not None and cfg.eval_steps and (step % cfg.eval_steps == 0 or step == steps):
                value = eval_fn(model)
                model.train()
                row["eval_nll"] = value
                if state["best_eval"] is None or value < state["best_eval"]:
                    state["best_eval"], state["bad_evals"] = value, 0
                    if cfg.early_stopping_patience:
                        best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    state["bad_evals"] += 1
                    if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                        state["stopped_early"] = True
                        acc.print(f"[{desc}] early stop at step {step} (best held-out NLL {state['best_eval']:.4f})")
            if step % max(1, cfg.logging_steps) == 0 or "eval_nll" in row:
                logger.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            history.append(row)
            if cfg.save_steps and (step % cfg.save_steps == 0) and acc.is_main_process:
                save_checkpoint(ckpt_root, step, model, optimizer, scheduler, state, best_weights,
                                keep=cfg.save_total_limit)
            if cfg.save_steps:
                acc.wait_for_everyone()
    finally:
        bar.close()
        logger.close()
    finished = step >= steps or bool(state.get("stopped_early"))
    if finished and best_weights is not None:
        model.load_state_dict(best_weights)
    return TrainResult(steps=step, finished=finished, best_eval=state["best_eval"], history=history)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' gradient (activation) checkpointing of the decoder layers, non-reentrant so frozen inputs and
    LoRA work (`activation_checkpointing_enable` where transformers has it: the old name is deprecated in 5.x)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5.24
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _parts(value: Any, what: str) -> dict[str, Any]:
    """A single count / loss as {"loss": value}; a dict as is."""
    if isinstance(value, dict):
        if not value:
            raise ValueError(f"{what} returned an empty dict")
        return value
    return {SINGLE: value}


def accumulate_gradients(
    acc: Any, prepared: nn.Module, batches: list[dict[str, Any]], count_items: CountFn, loss_fn: LossFn,
) -> tuple[float, dict[str, float], int]:
    """Backward over micro-batches so the gradient is that of sum_parts (summed part) / (global count of part).

    A loss with one part (count_items -> int, loss_fn -> Tensor) is the sum of losses over the global
    item count; with several (dicts keyed alike, e.g. {"dpo": pairs, "nll": chosen tokens}) each part
    has its own normaliser, so accumulation and DDP are exact for every part. Counts are summed over
    micro-batches and processes first; each micro loss is scaled by world_size / count because DDP
    averages gradients over processes. Returns (the global loss, metrics averaged over micro-batches and
    processes, plus loss/<part> for several parts, and tokens seen by all processes).
    """
    world = acc.num_processes
    per_batch = [_parts(count_items(b), "count_items") for b in batches]
    keys = sorted(per_batch[0])
    if any(sorted(c) != keys for c in per_batch):
        raise ValueError(f"count_items must return the same parts for every micro-batch, got {per_batch}")
    counts = torch.tensor([float(sum(c[k] for c in per_batch)) for k in keys], dtype=torch.float64, device=acc.device)
    if world > 1:
        counts = acc.reduce(counts, reduction="sum")
    denom = {k: max(float(v), 1.0) for k, v in zip(keys, counts.tolist())}
    part_sums = dict.fromkeys(keys, 0.0)
    metric_sums: dict[str, float] = {}
    tokens = 0
    for i, batch in enumerate(batches):
        batch = {k: v.to(acc.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        tokens += int(batch["attention_mask"].sum())
        ctx = acc.no_sync(prepared) if i < len(batches) - 1 else _null()
        with ctx:
            losses, metrics = loss_fn(prepared, batch)
            losses = _parts(losses, "loss_fn")
            if sorted(losses) != keys:
                raise ValueError(f"loss_fn returned parts {sorted(losses)} but count_items counted {keys}")
            acc.backward(sum(losses[k] * (world / denom[k]) for k in keys))
        for k in keys:
            part_sums[k] += float(losses[k].detach())
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
    names = sorted(metric_sums)
    local = torch.tensor([part_sums[k] for k in keys] + [metric_sums[k] for k in names] + [float(tokens)],
                         dtype=torch.float64, device=acc.device)
    if world > 1:
        local = acc.reduce(local, reduction="sum")
    totals = local.tolist()
    parts = {k: totals[i] / denom[k] for i, k in enumerate(keys)}
    n_micro = len(batches) * world
    metrics_out = {k: totals[len(keys) + j] / n_micro for j, k in enumerate(names)}
    if len(keys) > 1:
        metrics_out.update({f"loss/{k}": v for k, v in parts.items()})
    return sum(parts.values()), metrics_out, int(totals[-1])


class _null:
    """A do-nothing context manager."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
