"""TRL trainers with TRL's own fused paths against the same trainers on Proxy-KD's losses, side by side.

One training step (the trainer's `compute_loss` + backward, no optimizer) on the same model and batch:

- SFT: `trl.SFTTrainer` (TRL's `add_fused_lm_head` log-probs) vs `ProxyKDTrainer(alpha=0)` (our fused CE).
- DPO: `trl.DPOTrainer` (fused log-probs, online reference model) vs `ProxyDPOTrainer` (token-chunked dpo_loss),
  sigmoid DPO + 1 x NLL ("sft"), the Proxy-KD alignment objective.
- KD: `trl.DistillationTrainer` (chunked generalized JSD; beta=0 = forward KL, on the dataset completions,
  generation excluded) vs `ProxyKDTrainer` with an online proxy, forward KL, no NLL, no sample weights:
  the same objective. The teacher/proxy is a second model of the same shape.

Model: a SmolLM2-shaped Llama (hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152, tied head) with
`--layers` layers (4) built from a config; batch 4 x 512 (prompt 64 tokens, ragged right padding), fp32,
on CPU. Each variant runs in a fresh process; time = median of the timed steps; peak = resident
high-water mark during the timed steps above the resident set after warm-up (benchmarks/_cpu_measure.py).
The loss of the first step is printed next to each variant's figures (the pairs must agree).
Writes benchmarks/results/trl_integration.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from _cpu_measure import MALLOC_ENV, measure

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PAIRS = {"SFT": ("sft_trl", "sft_ours"), "DPO": ("dpo_trl", "dpo_ours"), "KD": ("kd_trl", "kd_ours"),
         "SFT, token metrics every step": ("sft_trl", "sft_oursmetrics")}
VARIANTS = tuple(dict.fromkeys(v for pair in PAIRS.values() for v in pair))
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_model(layers: int, seed: int):
    """A randomly initialised SmolLM2-shaped Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **SMOLLM2)).eval()


def build_batch(rows: int, width: int, prompt: int, seed: int = 0) -> dict:
    """Token ids [rows, width], the first `prompt` tokens a prompt, ragged right padding (>= 3/4 of the row)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, SMOLLM2["vocab_size"], (rows, width), generator=g)
    lengths = [width - (r * width // (4 * rows)) for r in range(rows)]
    mask = torch.zeros(rows, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    completion = mask.clone()
    completion[:, :prompt] = 0
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}


def _tokenizer():
    """A word-level tokenizer with exactly the model's vocabulary (no download)."""
    from proxykd_fast.demo.world import build_tokenizer

    return build_tokenizer(SMOLLM2["vocab_size"] - 4)


def _dummy(kind: str):
    """The trainers want a train dataset; the timed step uses `build_batch` instead."""
    from datasets import Dataset

    if kind == "dpo":
        return Dataset.from_list([{"prompt": "t1 t2", "chosen": " t3", "rejected": " t4"}] * 4)
    return Dataset.from_list([{"prompt": "t1 t2", "completion": " t3 t4"}] * 4)


def trl_only(opts: dict) -> dict:
    """The options TRL's own configs take (ours add token_metrics)."""
    return {k: v for k, v in opts.items() if k != "token_metrics"}


def make_step(variant: str, args: argparse.Namespace):
    """(step closure returning the loss, settle function) for one variant."""

    common = dict(report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
                  per_device_train_batch_size=args.batch, max_length=None)
    out = f"/tmp/trl_bench_{variant}"
    tok = _tokenizer()
    policy = build_model(args.layers, 0)
    kind, side = variant.split("_")
    if side == "oursmetrics":  # ours computing entropy / accuracy on every step, as TRL does
        common["token_metrics"] = "every_step"
    side = side[:4]
    b = build_batch(args.batch * (2 if kind == "dpo" else 1), args.seq, args.prompt)
    labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
    n_items = int((labels[:, 1:] != -100).sum())
    if kind == "sft":
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels}
        if side == "trl":
            from trl import SFTConfig, SFTTrainer

            trainer = SFTTrainer(policy, args=SFTConfig(out, **trl_only(common)), train_dataset=_dummy("sft"),
                                 processing_class=tok)
        else:
            from proxykd_fast.integrations.trl import ProxyKDConfig, ProxyKDTrainer

            trainer = ProxyKDTrainer(policy, args=ProxyKDConfig(out, alpha=0.0, backend="torch", **common),
                                     train_dataset=_dummy("sft"), processing_class=tok)
    elif kind == "dpo":
        inputs = dict(b)
        ref = build_model(args.layers, 1)
        opts = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0], beta=0.1, **common)
        if side == "trl":
            from trl import DPOConfig, DPOTrainer

            trainer = DPOTrainer(policy, ref_model=ref, args=DPOConfig(out, **trl_only(opts)), train_dataset=_dummy("dpo"),
                                 processing_class=tok)
        else:
            from proxykd_fast.integrations.trl import ProxyDPOConfig, ProxyDPOTrainer

            trainer = ProxyDPOTrainer(policy, ref_model=ref, args=ProxyDPOConfig(out, backend="torch", **opts),
                                      train_dataset=_dummy("dpo"), processing_class=tok)
        n_items = None
    else:
        teacher = build_model(args.layers, 1)
        if side == "trl":
            from trl import DistillationConfig, DistillationTrainer

            cfg = DistillationConfig(out, beta=0.0, temperature=1.0, **{k: v for k, v in trl_only(common).items()
                                                                       if k != "max_length"})
            trainer = DistillationTrainer(policy, teacher_model=teacher, args=cfg, train_dataset=_dummy("sft"),
                                          processing_class=tok)
            p = args.prompt
            inputs = {"prompt_ids": b["input_ids"][:, :p], "prompt_mask": b["attention_mask"][:, :p],
                      "completion_ids": b["input_ids"][:, p:], "completion_mask": b["completion_mask"][:, p:]}
        else:
            from proxykd_fast.integrations.trl import ProxyKDConfig, ProxyKDTrainer

            cfg = ProxyKDConfig(out, alpha=1.0, nll_weight=0.0, use_weights=False, divergence="forward_kl",
                                backend="torch", **common)
            trainer = ProxyKDTrainer(policy, proxy_model=teacher, args=cfg, train_dataset=_dummy("sft"),
                                     processing_class=tok)
            inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels}
    model = trainer.model.train()

    def step() -> float:
        loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=n_items)
        loss.backward()
        model.zero_grad(set_to_none=True)
        for lists in trainer._metrics.values():
            lists.clear()
        return float(loss.detach())

    def settle() -> None:
        from proxykd_fast.losses import release_workspace

        release_workspace()

    return step, settle


def worker(args: argparse.Namespace) -> None:
    """Measure one variant in this process; print a RESULT line."""
    import torch

    torch.set_num_threads(args.threads)
    step, settle = make_step(args.worker, args)
    loss = step()
    res = measure(step, args.repeats, settle)
    print("RESULT " + json.dumps({"variant": args.worker, "loss": loss, **res}), flush=True)


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh process (fixed malloc thresholds, as every CPU benchmark here)."""
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__)), "--worker", variant, "--layers", str(args.layers), "--batch",
           str(args.batch), "--seq", str(args.seq), "--prompt", str(args.prompt), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"variant": variant, "error": (proc.stderr or proc.stdout)[-2000:]}


def table(results: dict[str, dict]) -> str:
    """Markdown: per trainer, TRL's fused path and ours side by side."""
    lines = ["| trainer | TRL fused: s/step | ours: s/step | TRL fused: peak MB | ours: peak MB | loss TRL / ours |",
             "|---|---:|---:|---:|---:|---|"]
    for name, (theirs, ours) in PAIRS.items():
        a, b = results.get(theirs, {}), results.get(ours, {})
        if "time_s" not in a or "time_s" not in b:
            lines.append(f"| {name} | {a.get('error', '-')[:40]} | {b.get('error', '-')[:40]} | | | |")
            continue
        lines.append(f"| {name} | {a['time_s']:.2f} | {b['time_s']:.2f} | {a['peak_above_inputs_mb']:.0f} | "
                     f"{b['peak_above_inputs_mb']:.0f} | {a['loss']:.5f} / {b['loss']:.5f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=VARIANTS)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="rows (SFT, KD) or pairs (DPO)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "trl_integration.json"))
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from tqdm.auto import tqdm

    results = {}
    for v in tqdm(args.variants, desc="variants"):
        results[v] = run_variant(v, args)
    import torch
    import trl

    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
            "torch": torch.__version__, "trl": trl.__version__, "layers": args.layers, "batch": args.batch,
            "seq": args.seq, "prompt": args.prompt, "repeats": args.repeats, "dtype": "float32"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
