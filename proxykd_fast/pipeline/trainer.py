"""A small resumable training loop shared by the stages: accelerate, accumulation, logging, checkpoints."""

from __future__ import annotations

import copy
import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import batch_indices
from .modeling import HiddenAndHead

# loss_fn(wrapped_model, batch) -> (summed loss, metrics averaged over the micro-batch)
LossFn = Callable[[nn.Module, dict[str, Any]], tuple[Tensor, dict[str, float]]]


@dataclass
class TrainResult:
    """What a training run ended with."""

    steps: int
    finished: bool
    best_eval: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def make_accelerator() -> Any:
    """An `accelerate.Accelerator` (CPU when no GPU); works unchanged under `accelerate launch`/torchrun."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)


def peak_memory_mb() -> float:
    """Peak GPU memory (CUDA) or peak resident memory of the process, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLogger:
    """Per-step metrics to JSONL, plus tensorboard/wandb when asked for and installed."""

    def __init__(self, path: Path, report_to: str, enabled: bool, resume_step: int | None) -> None:
        self.path = path
        self.enabled = enabled
        self.writers: list[Any] = []
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(k + "\n" for k in keep))
        elif resume_step is None and path.exists():
            path.unlink()
        for name in [r.strip() for r in report_to.split(",") if r.strip() and r.strip() != "none"]:
            try:
                if name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    self.writers.append(SummaryWriter(str(path.parent / "tb")))
                elif name == "wandb":
                    import wandb

                    self.writers.append(wandb)
            except ImportError:
                print(f"report_to={name}: not installed, skipping")

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (a dict with 'step')."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        for w in self.writers:
            nums = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            if hasattr(w, "add_scalar"):
                for k, v in nums.items():
                    w.add_scalar(k, v, row["step"])
            else:
                w.log(nums, step=row["step"])


def total_steps(cfg: TrainConfig, n: int, global_batch: int, epochs: float | None = None, steps: int = 0) -> int:
    """Steps of a run: explicit steps, else epochs over n samples."""
    if steps > 0:
        return steps
    if cfg.max_steps > 0:
        return cfg.max_steps
    ep = cfg.num_epochs if epochs is None else epochs
    return max(1, math.ceil(ep * n / global_batch))


def train(
    cfg: TrainConfig,
    model: nn.Module,
    *,
    n_train: int,
    make_batch: Callable[[list[int]], dict[str, Any]],
    count_items: Callable[[dict[str, Any]], int],
    loss_fn: LossFn,
    out_dir: str | Path,
    steps: int,
    eval_fn: Callable[[nn.Module], float] | None = None,
    accelerator: Any = None,
    desc: str = "train",
) -> TrainResult:
    """Train `model` in place for `steps` optimizer steps; resumable from `out_dir/checkpoints`."""
    acc = accelerator or make_accelerator()
    out_dir = Path(out_dir)
    world, rank = acc.num_processes, acc.process_index
    wrapped = HiddenAndHead(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    prepared = acc.prepare(wrapped)
    ckpt_root = out_dir / "checkpoints"
    state: dict[str, Any] = {"best_eval": None, "bad_evals": 0, "stopped_early": False}
    best_weights: dict[str, Tensor] | None = None
    step = 0
    resume_step = None
    if cfg.resume and (ckpt := latest_checkpoint(ckpt_root)) is not None:
        state, best_weights = load_checkpoint(ckpt, model, optimizer, scheduler)
        step = resume_step = int(state["step"])
        acc.print(f"[{desc}] resumed from {ckpt} at step {step}")
    logger = MetricsLogger(out_dir / "metrics.jsonl", cfg.report_to, acc.is_main_process, resume_step)
    micro = cfg.batch_size
    global_batch = micro * cfg.grad_accum * world
    history: list[dict[str, Any]] = []
    ran = 0
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=step, desc=desc, disable=not (cfg.progress and acc.is_main_process), leave=False)
    t0 = time.perf_counter()
    while step < steps and not state.get("stopped_early"):
        if cfg.max_steps_this_run and ran >= cfg.max_steps_this_run:
            break
        idx = batch_indices(n_train, global_batch, step, cfg.seed)
        mine = idx[rank * micro * cfg.grad_accum : (rank + 1) * micro * cfg.grad_accum]
        batches = [make_batch(mine[i * micro : (i + 1) * micro]) for i in range(cfg.grad_accum)]
        loss_total, sums, tokens = accumulate_gradients(acc, prepared, batches, count_items, loss_fn)
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            gnorm = float("nan")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ran += 1
        bar.update(1)
        elapsed = time.perf_counter() - t0
        row = {"step": step, "loss": loss_total, **sums,
               "grad_norm": gnorm, "lr": scheduler.get_last_lr()[0],
               "tokens_per_s": tokens * world / max(elapsed, 1e-9), "peak_memory_mb": peak_memory_mb()}
        t0 = time.perf_counter()
        if eval_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == steps):
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
        if step % max(1, cfg.log_every) == 0 or "eval_nll" in row:
            logger.log(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        history.append(row)
        if cfg.save_every and (step % cfg.save_every == 0) and acc.is_main_process:
            save_checkpoint(ckpt_root, step, model, optimizer, scheduler, state, best_weights)
        if cfg.save_every:
            acc.wait_for_everyone()
    bar.close()
    finished = step >= steps or bool(state.get("stopped_early"))
    if finished and best_weights is not None:
        model.load_state_dict(best_weights)
    return TrainResult(steps=step, finished=finished, best_eval=state["best_eval"], history=history)


def accumulate_gradients(
    acc: Any, prepared: nn.Module, batches: list[dict[str, Any]], count_items: Callable[[dict[str, Any]], int],
    loss_fn: LossFn,
) -> tuple[float, dict[str, float], int]:
    """Backward over micro-batches so the gradient is that of (sum of losses) / (global item count).

    The item count is summed over micro-batches and processes first; each micro loss is scaled by
    world_size / count because DDP averages gradients over processes. Returns (local loss share,
    averaged metrics, tokens seen by this process).
    """
    world = acc.num_processes
    items = torch.tensor(float(sum(count_items(b) for b in batches)), device=acc.device)
    if world > 1:
        items = acc.reduce(items, reduction="sum")
    denom = max(float(items), 1.0)
    sums: dict[str, float] = {}
    loss_total = 0.0
    tokens = 0
    for i, batch in enumerate(batches):
        batch = {k: v.to(acc.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        tokens += int(batch["attention_mask"].sum())
        ctx = acc.no_sync(prepared) if i < len(batches) - 1 else _null()
        with ctx:
            loss_sum, metrics = loss_fn(prepared, batch)
            acc.backward(loss_sum * (world / denom))
        loss_total += float(loss_sum.detach()) / denom
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
    return loss_total * world, sums, tokens


class _null:
    """A do-nothing context manager."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's weights."""
    return copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})
