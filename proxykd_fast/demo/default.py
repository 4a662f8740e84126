"""The embedded default demo: a Markov-chain world, a served black-box teacher, Proxy-KD vs SFT."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proxykd_fast.pipeline import AlignProxyConfig, DistillConfig, PrecomputeConfig, align_proxy, distill, precompute
from proxykd_fast.pipeline.data import load_records, tokenize_records
from proxykd_fast.pipeline.evaluate import heldout_kl
from proxykd_fast.pipeline.modeling import load_model, load_tokenizer

from .world import MarkovWorld, build_llama, build_tokenizer, pretrain, save, scale_head, words_to_text


@dataclass
class DemoSettings:
    """Sizes and budgets of the default demo (measured to fit 10 minutes on 2 CPU cores)."""

    n_words: int = 512
    fanout: int = 8
    conc: float = 0.3
    related_keep: float = 0.7
    teacher_hidden: int = 64
    teacher_layers: int = 2
    teacher_steps: int = 500
    teacher_batch: int = 32
    teacher_scale: float = 1.5
    pretrain_seqs: int = 20000
    prompt_len: int = 8
    answer_len: int = 24
    n_train: int = 3000
    n_val: int = 300
    n_eval: int = 1000
    proxy_sft_steps: int = 500
    proxy_round_lr: float = 2e-4
    align_split: str = "0:0.34"
    proxy_lr: float = 1e-3
    rounds: int = 2
    student_hidden: int = 32
    student_layers: int = 2
    student_steps: int = 400
    student_lr: float = 3e-3
    batch_size: int = 32
    alpha: float = 1.0
    eval_every: int = 25
    patience: int = 4
    prior_order: int = 3
    missing_contexts: float = 0.0  # uneven-alignment variant: share of contexts the proxy never pre-trains on
    variant: str = ""  # "" (the main world) or a name: its outputs go to seed<N>/<variant>/


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def skipped_contexts(s: DemoSettings, seed: int) -> np.ndarray:
    """Word ids whose next-token targets the proxy's pre-training leaves out (none unless missing_contexts)."""
    rng = np.random.default_rng(seed + 202)
    n = int(round(s.missing_contexts * s.n_words))
    return np.sort(rng.choice(s.n_words, n, replace=False)) if n else np.zeros(0, dtype=np.int64)


def build_models(root: Path, s: DemoSettings, seed: int, world: MarkovWorld, tok: Any) -> tuple[Path, Path]:
    """Train (or load from cache) the teacher and the proxy pre-trained on a related world."""
    suffix = f"_missing{s.missing_contexts:g}" if s.missing_contexts else ""
    teacher_dir, proxy_dir = root / "teacher", root / f"proxy_pretrained{suffix}"
    if not (teacher_dir / "config.json").exists():
        _log("training the teacher on the world (cached afterwards)")
        teacher = build_llama(len(tok), s.teacher_hidden, s.teacher_layers, 2 * s.teacher_hidden, 4, seed)
        t = time.perf_counter()
        pretrain(teacher, world.sample(s.pretrain_seqs, s.prompt_len + s.answer_len, seed + 11), s.teacher_steps,
                 s.teacher_batch, 3e-3, seed, "teacher")
        _log(f"teacher trained in {time.perf_counter() - t:.0f}s")
        scale_head(teacher, s.teacher_scale)
        save(teacher, tok, teacher_dir)
    if not (proxy_dir / "config.json").exists():
        _log("pre-training the proxy on a related world (cached afterwards)")
        related = world.related(s.related_keep, s.conc, seed + 101)
        proxy = build_llama(len(tok), s.teacher_hidden, s.teacher_layers, 2 * s.teacher_hidden, 4, seed + 1)
        pretrain(proxy, related.sample(s.pretrain_seqs, s.prompt_len + s.answer_len, seed + 13), s.teacher_steps,
                 s.teacher_batch, 3e-3, seed + 1, "proxy-pretrain", skip_contexts=skipped_contexts(s, seed))
        save(proxy, tok, proxy_dir)
    return teacher_dir, proxy_dir


def write_if_changed(path: Path, text: str) -> None:
    """Write `text` atomically, and only when the file differs: the uneven variant shares the main run's data files
    and may run beside it, so a reader never sees a half-written file."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def collect_teacher(root: Path, s: DemoSettings, seed: int, world: MarkovWorld, teacher_dir: Path) -> Path:
    """Serve the teacher over HTTP and collect one answer per prompt: the pipeline sees only this text."""
    from proxykd_fast.teacher import CollectConfig, collect
    from proxykd_fast.teacher.server import TeacherServer

    prompts = world.sample(s.n_train + s.n_val, s.prompt_len, seed + 21)
    pfile = root / "prompts.jsonl"
    write_if_changed(pfile, "".join(json.dumps({"id": str(i), "prompt": words_to_text(p)}) + "\n"
                                    for i, p in enumerate(prompts)))
    out = root / "teacher_answers"
    model = load_model(str(teacher_dir))
    with TeacherServer(model, load_tokenizer(str(teacher_dir)), model_name="demo-teacher", max_batch_size=128,
                       batch_wait_ms=20, log_level="warning", num_threads=torch.get_num_threads()) as server:
        summary = collect(CollectConfig(prompts=pfile, out=out, base_url=server.base_url, model="demo-teacher",
                                        mode="completions", max_tokens=s.answer_len, temperature=1.0, seed=seed,
                                        concurrency=128, progress=False, max_retries=2, backoff_base=0.05))
    _log(f"collected {summary.completed} new teacher answers ({summary.already_done} cached) "
         f"in {summary.elapsed_s:.1f}s over HTTP")
    if summary.remaining > 0.05 * summary.units_total:
        raise RuntimeError(f"teacher collection left {summary.remaining} prompts without an answer")
    if summary.remaining:
        _log(f"warning: {summary.remaining} prompts got no usable answer (e.g. an empty one) and are skipped")
    return out


def split_answers(root: Path, answers: Path, s: DemoSettings) -> tuple[Path, Path]:
    """Train / validation files of teacher answers (validation = black-box early-stopping data)."""
    recs = sorted(load_records(answers), key=lambda r: int(r["id"]))
    keep = ("prompt", "completion", "finish_reason")
    train, val = root / "train.jsonl", root / "val.jsonl"
    n_train = min(s.n_train, len(recs) - max(1, s.n_val // 2))
    write_if_changed(train, "".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in recs[:n_train]))
    write_if_changed(val, "".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in recs[n_train:]))
    return train, val


@torch.no_grad()
def eval_set(root: Path, s: DemoSettings, seed: int, world: MarkovWorld, teacher_dir: Path) -> Path:
    """Fresh prompts with fresh teacher samples, drawn by the evaluator (who owns the teacher)."""
    path = root / "eval.jsonl"
    if path.exists():
        return path
    tok = load_tokenizer(str(teacher_dir))
    teacher = load_model(str(teacher_dir)).eval()
    prompts = torch.from_numpy(world.sample(s.n_eval, s.prompt_len, seed + 31) + 4)
    torch.manual_seed(seed + 32)
    rows = []
    for chunk in prompts.split(250):
        out = teacher.generate(input_ids=chunk, attention_mask=torch.ones_like(chunk), do_sample=True, top_k=0,
                               max_new_tokens=s.answer_len, min_new_tokens=s.answer_len, pad_token_id=0)
        for p, full in zip(chunk, out):
            rows.append({"prompt": tok.decode(p), "completion": tok.decode(full[len(p):], skip_special_tokens=True),
                         "finish_reason": "length"})
    write_if_changed(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


MAIN_ROWS = ("sft_only", "takd", "proxykd", "proxykd_no_weights", "proxykd_no_dpo", "proxykd_unaligned_proxy",
             "bayes_prior", "bayes_posterior", "whitebox_kd")
UNEVEN_ROWS = ("sft_only", "proxykd", "proxykd_no_weights")


def sft_phase_model(proxy0_dir: Path, align_dir: Path, out: Path) -> Path:
    """The proxy after align-proxy's SFT warm-up only (before any DPO round), saved for from_pretrained."""
    from proxykd_fast.pipeline.checkpoint import finished_phase

    if not (out / "config.json").exists():
        done = finished_phase(align_dir / "sft")
        if done is None:
            raise RuntimeError(f"{align_dir}: align-proxy's SFT phase has not finished")
        model = load_model(str(proxy0_dir))
        model.load_state_dict(done[1])
        save(model, load_tokenizer(str(proxy0_dir)), out)
    return out


RESULT = "run_result.json"


def finished(cfg: DistillConfig) -> bool:
    """Whether cfg.output_dir holds a finished distill run of exactly these options (the demo then reuses it)."""
    from proxykd_fast.pipeline.runinfo import run_identity, run_options

    out = Path(cfg.output_dir)
    info, summary = out / "distill_run.json", out / "distill_summary.json"
    return summary.exists() and info.exists() and (out / "config.json").exists() and \
        json.loads(info.read_text(encoding="utf-8")) == run_options(run_identity(cfg), exclude=())


def distill_students(root: Path, rows: tuple[str, ...], common: dict[str, Any], variants: dict[str, dict[str, Any]],
                     timings: dict[str, Any]) -> dict[str, str]:
    """Distill each of `rows` into root/<row> (options: `common` plus the row's `variants`), reusing a student
    that finished with the same options; each one's seconds go into `timings`. Returns the students' dirs."""
    dirs = {}
    for name in rows:
        t = time.perf_counter()
        dirs[name] = str(root / name)
        cfg = DistillConfig(output_dir=dirs[name], **common, **variants[name])
        if finished(cfg):
            _log(f"distill: {name} (finished earlier with the same options: reused)")
            continue
        _log(f"distill: {name}")
        distill(cfg)
        timings[f"{name}_s"] = time.perf_counter() - t
        _log(f"  {name} took {timings[f'{name}_s']:.0f}s")
    return dirs


def run_seed(out: Path, seed: int, s: DemoSettings, progress: bool = False,
             rows: tuple[str, ...] = MAIN_ROWS, reuse: bool = False) -> dict[str, Any]:
    """Every stage for one seed; returns the eval table rows, the target-quality table and output dirs.

    The result is written to run_result.json last; with `reuse`, a result of the same settings and rows is
    read back instead of running again. Stages resume from disk: align-proxy keeps its finished phases,
    precompute and prior their shards, and a student that finished with the same options is reused.
    """
    from .bayes import bayes_targets

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    data_root = out / f"seed{seed}"
    root = data_root / s.variant if s.variant else data_root
    key = {"settings": dataclasses.asdict(s), "rows": list(rows)}
    if reuse and (root / RESULT).exists():
        stored = json.loads((root / RESULT).read_text(encoding="utf-8"))
        if stored.get("key") == key:
            _log(f"seed {seed}{' ' + s.variant if s.variant else ''}: reusing {root / RESULT}")
            return stored["result"]
    root.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(s.n_words)
    world = MarkovWorld.make(s.n_words, s.fanout, s.conc, seed)
    teacher_dir, proxy0_dir = build_models(out / "cache" / f"seed{seed}", s, seed, world, tok)
    answers = collect_teacher(data_root, s, seed, world, teacher_dir)
    train, val = split_answers(data_root, answers, s)
    evalf = eval_set(data_root, s, seed, world, teacher_dir)
    timings = {"setup_s": time.perf_counter() - t0}

    t = time.perf_counter()
    _log("align-proxy: SFT warm-up + NLL/DPO rounds")
    proxy_dir = root / "proxy_aligned"
    align = align_proxy(AlignProxyConfig(
        proxy=str(proxy0_dir), data=str(train), eval_data=str(val), output_dir=str(proxy_dir), seed=seed,
        warmup_split="0:1", align_split=s.align_split, warmup_steps_sft=s.proxy_sft_steps, rounds=s.rounds,
        round_epochs=1.0, learning_rate=s.proxy_lr, round_learning_rate=s.proxy_round_lr, batch_size=s.batch_size,
        eval_every=25, early_stopping_patience=s.patience, gen_max_new_tokens=s.answer_len, gen_batch_size=250,
        beta=0.1, nll_alpha=1.0, eval_batch_size=300, progress=progress, save_every=0, resume="auto"))
    timings["align_s"] = time.perf_counter() - t
    _log(f"proxy aligned in {timings['align_s']:.0f}s: " + ", ".join(
        f"{p['phase']} {p['steps']} steps NLL {p['eval_nll']:.3f}" for p in align["phases"]))
    proxy_sft = sft_phase_model(proxy0_dir, proxy_dir, root / "proxy_sft")

    t = time.perf_counter()
    common_pre = dict(data=str(train), split="0:1", top_k=10, batch_size=250, shard_size=1000, loglik="mean",
                      normalize_weights=True, progress=progress, resume="auto")
    targets: dict[str, Path] = {}
    proxies = {"aligned": proxy_dir, "unaligned": proxy0_dir, "sft": proxy_sft}
    needs = {"aligned": True, "unaligned": "proxykd_unaligned_proxy" in rows,
             "sft": "takd" in rows or "proxykd_no_dpo" in rows}
    for name, pdir in proxies.items():
        if needs[name]:
            targets[name] = root / f"targets_{name}"
            precompute(PrecomputeConfig(proxy=str(pdir), output_dir=str(targets[name]), **common_pre))
    timings["precompute_s"] = time.perf_counter() - t
    bayes = "bayes_prior" in rows or "bayes_posterior" in rows
    fit = None
    prior_dir = None
    if bayes:
        prior_dir, bayes_dirs, fit = bayes_targets(root, train, val, proxy_dir, s.prior_order, common_pre,
                                                   timings=timings, progress=progress, log=_log)
        targets.update(bayes_dirs)

    student0 = root / "student_init"
    if not (student0 / "config.json").exists():
        save(build_llama(len(tok), s.student_hidden, s.student_layers, 2 * s.student_hidden, 4, seed + 2), tok,
             student0)
    common = dict(student=str(student0), eval_data=str(val), split="0:1", seed=seed, max_steps=s.student_steps,
                  learning_rate=s.student_lr, batch_size=s.batch_size, eval_every=s.eval_every,
                  early_stopping_patience=s.patience, eval_batch_size=300, progress=progress,
                  loglik="mean", normalize_weights=True)
    variants = {
        "sft_only": dict(data=str(train), alpha=0.0),
        "takd": dict(targets=str(targets.get("sft")), alpha=s.alpha, use_weights=False),
        "proxykd": dict(targets=str(targets["aligned"]), alpha=s.alpha),
        "proxykd_no_weights": dict(targets=str(targets["aligned"]), alpha=s.alpha, use_weights=False),
        "proxykd_no_dpo": dict(targets=str(targets.get("sft")), alpha=s.alpha),
        "proxykd_unaligned_proxy": dict(targets=str(targets.get("unaligned")), alpha=s.alpha),
        "bayes_prior": dict(targets=str(targets.get("prior")), alpha=s.alpha, use_weights=False),
        "bayes_posterior": dict(targets=str(targets.get("posterior")), alpha=s.alpha, use_weights=False),
        "whitebox_kd": dict(proxy=str(teacher_dir), data=str(train), alpha=s.alpha, use_weights=False),
    }
    dirs = distill_students(root, rows, common, variants, timings)

    t = time.perf_counter()
    teacher = load_model(str(teacher_dir))
    examples = tokenize_records(load_records(evalf), tok, 64)
    results = {}
    evaluated = [*dirs.items(), ("proxy_aligned", str(proxy_dir)), ("proxy_unaligned", str(proxy0_dir))]
    if "sft" in targets:
        evaluated.append(("proxy_sft", str(proxy_sft)))
    for name, path in evaluated:
        results[name] = heldout_kl(load_model(path), teacher, examples, tok.pad_token_id, 250)
    timings["eval_s"] = time.perf_counter() - t
    t = time.perf_counter()
    from .target_quality import target_kls

    quality = target_kls(teacher_dir, {"proxy_sft": proxy_sft, "proxy_aligned": proxy_dir},
                         prior_dir, fit, "proxy_aligned", examples, tok.pad_token_id)
    timings["target_quality_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    result = {"eval": results, "targets_kl": quality, "posterior_fit": fit, "dirs": dirs, "align": align,
              "timings": timings, "targets": {k: str(v) for k, v in targets.items()}}
    (root / RESULT).write_text(json.dumps({"key": key, "result": result}, indent=2, default=str), encoding="utf-8")
    return result
