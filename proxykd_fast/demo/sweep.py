"""The alpha sweep: Proxy-KD students on one seed's aligned-proxy targets, one per KD weight alpha."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from proxykd_fast.pipeline import DistillConfig, distill
from proxykd_fast.pipeline.data import load_records, tokenize_records
from proxykd_fast.pipeline.evaluate import heldout_kl
from proxykd_fast.pipeline.metrics import read_metrics
from proxykd_fast.pipeline.modeling import load_model, load_tokenizer

from .default import DemoSettings, _log


def alpha_sweep(out: Path, seed: int, s: DemoSettings, alphas: list[float], targets: tuple[str, ...] = ("aligned",),
                progress: bool = False, reuse: bool = False) -> dict[str, Any]:
    """For each target source and alpha: held-out KL/NLL, steps run, and the gradient norm of the first steps.

    Reads the targets a finished `run_seed` left in seed<N>/targets_<source> (aligned, sft, prior, posterior);
    source "teacher" is white-box KD on the teacher's full distribution. Weights only with aligned / sft.
    """
    root = out / f"seed{seed}"
    student0, val = root / "student_init", root / "val.jsonl"
    tok = load_tokenizer(str(student0))
    teacher = load_model(str(out / "cache" / f"seed{seed}" / "teacher"))
    examples = tokenize_records(load_records(root / "eval.jsonl"), tok, 64)
    rows: dict[str, Any] = {}
    done = root / "alpha_sweep.json"
    if reuse and done.exists():
        rows = {k: v for k, v in json.loads(done.read_text(encoding="utf-8")).items() if v.get("settings") ==
                dataclasses.asdict(s)}
    for source in targets:
        use_weights = source in ("aligned", "sft")
        for a in alphas:
            if f"{source}/{a:g}" in rows:
                continue
            t = time.perf_counter()
            name = f"sweep_{source}_alpha{a:g}"
            _log(f"alpha sweep: {source} targets, alpha {a:g}")
            # "teacher": white-box KD, the teacher's full distribution online (the demo's upper bound)
            src = dict(proxy=str(out / "cache" / f"seed{seed}" / "teacher"), data=str(root / "train.jsonl")) \
                if source == "teacher" else dict(targets=str(root / f"targets_{source}"))
            res = distill(DistillConfig(
                output_dir=str(root / name), student=str(student0), **src, alpha=a, use_weights=use_weights, eval_data=str(val), split="0:1", seed=seed, max_steps=s.student_steps,
                learning_rate=s.student_lr, batch_size=s.batch_size, eval_every=s.eval_every,
                early_stopping_patience=s.patience, eval_batch_size=300, progress=progress, loglik="mean",
                normalize_weights=True))
            metrics = read_metrics(root / name / "metrics.jsonl")
            first = [m["grad_norm"] for m in metrics[:10] if m.get("grad_norm") is not None]
            ev = heldout_kl(load_model(str(root / name)), teacher, examples, tok.pad_token_id, 250)
            rows[f"{source}/{a:g}"] = {"source": source, "alpha": a, **ev, "steps": res["steps"],
                                       "grad_norm_first10_mean": sum(first) / max(len(first), 1),
                                       "grad_norm_step1": first[0] if first else None,
                                       "seconds": time.perf_counter() - t, "settings": dataclasses.asdict(s)}
            done.write_text(json.dumps(rows, indent=2), encoding="utf-8")  # after each point: a kill loses one
    return {k: rows[k] for k in (f"{src}/{a:g}" for src in targets for a in alphas)}


def sweep_table(rows: dict[str, Any]) -> str:
    """Markdown: one row per (targets, alpha)."""
    lines = ["| targets | alpha | KL(teacher ‖ student) | NLL | steps run (early stop) | grad norm, step 1 | "
             "mean grad norm, steps 1-10 |", "|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['source']} | {r['alpha']:g} | {r['kl']:.4f} | {r['nll']:.4f} | {r['steps']} | "
                     f"{r['grad_norm_step1']:.3g} | {r['grad_norm_first10_mean']:.3g} |")
    return "\n".join(lines)
