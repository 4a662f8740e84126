"""Stage 1, align-proxy: SFT warm-up on teacher answers, then K rounds of NLL + DPO vs proxy samples."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from proxykd_fast.losses import dpo_loss, linear_cross_entropy, sequence_log_probs

from .chat import stop_token_ids
from .config import AlignProxyConfig, parse_split
from .data import (
    Example,
    iter_chunks,
    left_padded_prompts,
    load_records,
    preference_batch,
    sft_batch,
    tokenize_records,
)
from .distributed import shard_map
from .evaluate import heldout_nll
from .modeling import HiddenAndHead, apply_lora, check_model_matches_tokenizer, load_model, load_tokenizer, save_model
from .runinfo import clear_outputs, run_options, start_run
from .trainer import make_accelerator, total_steps, train

RUN_INFO = "align_run.json"
RANK_SEED_STRIDE = 7919  # rank r samples with seed + r * stride (rank 0: the single-process seed)


def sft_loss_fn(chunk_size: int | None, backend: str) -> Any:
    """Summed NLL of the answer tokens (the trainer divides by the global token count)."""

    def loss_fn(wrapped: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        hidden, w, b = wrapped(batch["input_ids"], batch["attention_mask"])
        loss = linear_cross_entropy(hidden, w, batch["labels"], bias=b, reduction="sum", chunk_size=chunk_size,
                                    backend=backend)
        n = max(int((batch["labels"] != -100).sum()), 1)
        return loss, {"nll": float(loss.detach()) / n}

    return loss_fn


def count_tokens(batch: dict[str, Any]) -> int:
    """Number of supervised tokens in a batch."""
    return int((batch["labels"] != -100).sum())


def _bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm progress bar (disabled unless `enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


@torch.no_grad()
def generate_rejected(
    model: nn.Module, tokenizer: Any, examples: list[Example], cfg: AlignProxyConfig, seed: int,
    progress: bool = False,
) -> list[list[int]]:
    """One sampled answer per prompt from the current proxy (batched generate), its stop token included."""
    model.eval()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, model)
    out: list[list[int]] = []
    bar = _bar(len(examples), "sample rejected", progress)
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
    bar.close()
    model.train()
    return out


def sample_rejected(
    model: nn.Module, tokenizer: Any, examples: list[Example], cfg: AlignProxyConfig, seed: int, acc: Any = None,
) -> list[list[int]]:
    """Rejected answers for every example; under DDP rank r samples examples[r::world] and all are gathered."""
    rank = acc.process_index if acc is not None else 0
    show = cfg.progress and (acc is None or acc.is_main_process)
    return _sharded(acc, examples, lambda part: generate_rejected(
        model, tokenizer, part, cfg, seed + RANK_SEED_STRIDE * rank, show))


@torch.no_grad()
def reference_logps(
    model: nn.Module, examples: list[Example], pad_id: int, cfg: AlignProxyConfig, acc: Any = None,
) -> Tensor:
    """[n, 2] summed log-probs of (chosen, rejected) under the current proxy: the reference (dpo_loss
    normalizes sums itself where the loss type needs means)."""
    show = cfg.progress and (acc is None or acc.is_main_process)

    def score(part: list[Example]) -> list[list[float]]:
        model.eval()
        wrapped = HiddenAndHead(model)
        device = next(model.parameters()).device
        rows: list[list[float]] = []
        bar = _bar(len(part), "reference log-probs", show)
        for chunk in iter_chunks(part, cfg.eval_batch_size):
            b = {k: v.to(device) for k, v in preference_batch(chunk, pad_id).items()}
            hidden, w, bias = wrapped(b["input_ids"], b["attention_mask"])
            lp = sequence_log_probs(hidden, w, b["labels"], bias=bias, chunk_size=cfg.chunk_size,
                                    backend=cfg.backend).float().cpu()
            n = len(chunk)
            rows.extend(torch.stack([lp[:n], lp[n:]], dim=1).tolist())
            bar.update(n)
        bar.close()
        model.train()
        return rows

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
            counts["nll"] = int((batch["labels"][:pairs] != -100).sum())
        return counts

    return count


def _phase_done(path: Path) -> bool:
    """A finished phase leaves its final weights and a marker."""
    return (path / "done.json").exists() and (path / "final_state.pt").exists()


def _finish_phase(path: Path, model: nn.Module, info: dict[str, Any], is_main: bool) -> None:
    """Record a finished phase (weights + summary) so a resumed run skips it."""
    if is_main:
        torch.save(model.state_dict(), path / "final_state.pt")
        (path / "done.json").write_text(json.dumps(info), encoding="utf-8")


def align_proxy(cfg: AlignProxyConfig, accelerator: Any = None) -> dict[str, Any]:
    """Run the proxy alignment; the aligned proxy is saved (loadable by from_pretrained) in output_dir."""
    acc = accelerator or make_accelerator()
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.proxy)
    model = load_model(cfg.proxy, cfg.dtype)
    check_model_matches_tokenizer(model, tok, "proxy")
    model = apply_lora(model, cfg.lora).to(acc.device)
    examples = tokenize_records(load_records(cfg.data), tok, cfg.max_length)
    lo, hi = parse_split(cfg.warmup_split, len(examples))
    warm = examples[lo:hi]
    lo, hi = parse_split(cfg.align_split, len(examples))
    align = examples[lo:hi]
    held = tokenize_records(load_records(cfg.eval_data), tok, cfg.max_length) if cfg.eval_data else []
    out = Path(cfg.output_dir)  # touched only once the inputs have loaded
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:  # a fresh run: no phase of an earlier run may be reused
        clear_outputs([out / "sft", *(p for p in out.glob("round-*") if p.is_dir()), out / "align_summary.json",
                       out / RUN_INFO], acc.is_main_process)
    acc.wait_for_everyone()
    start_run(out / RUN_INFO, run_options(cfg.to_dict()), cfg.resume, acc.is_main_process, "align-proxy")
    if acc.is_main_process:
        cfg.save(out / "align_config.yaml")
    pad = tok.pad_token_id

    def eval_fn(m: nn.Module) -> float:
        return heldout_nll(m, held, pad, cfg.eval_batch_size, cfg.chunk_size, cfg.backend)

    summary: dict[str, Any] = {"phases": []}
    best = eval_fn(model) if held else None
    summary["initial_eval_nll"] = best
    world = acc.num_processes
    # Phase 1: SFT warm-up.
    sft_dir = out / "sft"
    sft_dir.mkdir(exist_ok=True)
    if _phase_done(sft_dir):
        model.load_state_dict(torch.load(sft_dir / "final_state.pt", map_location="cpu", weights_only=True))
        info = json.loads((sft_dir / "done.json").read_text())
    else:
        steps = total_steps(cfg, len(warm), cfg.batch_size * cfg.grad_accum * world, epochs=cfg.warmup_epochs,
                            steps=cfg.warmup_steps_sft)
        res = train(cfg, model, n_train=len(warm), make_batch=lambda idx: sft_batch([warm[i] for i in idx], pad),
                    count_items=count_tokens, loss_fn=sft_loss_fn(cfg.chunk_size, cfg.backend), out_dir=sft_dir,
                    steps=steps, eval_fn=eval_fn if held else None, accelerator=acc, desc="proxy-sft")
        if not res.finished:
            return {"finished": False, "phase": "sft", "steps": res.steps}
        info = {"phase": "sft", "steps": res.steps, "eval_nll": eval_fn(model) if held else None}
        _finish_phase(sft_dir, model, info, acc.is_main_process)
    summary["phases"].append(info)
    best = info["eval_nll"]
    # Phase 2: K rounds of NLL + DPO with the proxy-at-round-start as reference.
    for r in range(1, cfg.rounds + 1):
        rdir = out / f"round-{r}"
        rdir.mkdir(exist_ok=True)
        if _phase_done(rdir):
            info = json.loads((rdir / "done.json").read_text())
            if info.get("kept", True):
                model.load_state_dict(torch.load(rdir / "final_state.pt", map_location="cpu", weights_only=True))
            summary["phases"].append(info)
            if not info.get("kept", True):
                break
            best = info["eval_nll"]
            continue
        start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rej_path = rdir / "rejected.json"
        if rej_path.exists():
            rejected = json.loads(rej_path.read_text())
        else:
            rejected = sample_rejected(model, tok, align, cfg, seed=cfg.seed * 1000 + r, acc=acc)
            if acc.is_main_process:
                rej_path.write_text(json.dumps(rejected))
        pairs = [Example(e.index, e.prompt, e.answer, rj, e.prompt_text) for e, rj in zip(align, rejected)]
        ref = reference_logps(model, pairs, pad, cfg, acc=acc)

        def make_batch(idx: list[int], pairs: list[Example] = pairs, ref: Tensor = ref) -> dict[str, Any]:
            b: dict[str, Any] = preference_batch([pairs[i] for i in idx], pad)
            b["ref_logps"] = ref[idx]
            return b

        steps = total_steps(cfg, len(pairs), cfg.batch_size * cfg.grad_accum * world, epochs=cfg.round_epochs,
                            steps=cfg.round_steps)
        round_cfg = dataclasses.replace(cfg, learning_rate=cfg.round_learning_rate or cfg.learning_rate)
        res = train(round_cfg, model, n_train=len(pairs), make_batch=make_batch, count_items=dpo_count_fn(cfg),
                    loss_fn=dpo_loss_fn(cfg), out_dir=rdir, steps=steps, eval_fn=eval_fn if held else None,
                    accelerator=acc, desc=f"proxy-dpo-{r}")
        if not res.finished:
            return {"finished": False, "phase": f"round-{r}", "steps": res.steps}
        value = eval_fn(model) if held else None
        kept = cfg.keep_round_if_worse or value is None or best is None or value <= best
        info = {"phase": f"round-{r}", "steps": res.steps, "eval_nll": value, "kept": kept,
                "last": {k: v for k, v in (res.history[-1] if res.history else {}).items() if "/" in k}}
        if not kept:
            model.load_state_dict(start_state)
            acc.print(f"[align-proxy] round {r} raised held-out NLL ({value:.4f} > {best:.4f}): reverted and stopped")
        _finish_phase(rdir, model, info, acc.is_main_process)
        summary["phases"].append(info)
        if not kept:
            break
        best = value
    summary["final_eval_nll"] = best
    summary["finished"] = True
    if acc.is_main_process:
        save_model(model, tok, str(out))
        (out / "align_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    acc.wait_for_everyone()
    return summary
