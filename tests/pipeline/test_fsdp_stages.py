"""Every stage under FSDP2 (--fsdp) on 2 gloo processes ends where the single-process run ends.

precompute writes the same bytes; distill (offline targets, with LoRA, gradient checkpointing and
packing; and with an online sharded proxy) and align-proxy (SFT, then a DPO round whose rejected
answers the sharded proxy samples) end on the same weights within fp32 tolerance; eval reports the
same numbers and generations. One spawn runs the stages one after another, as a pipeline would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.dist import single_process, spawn
from tests.support.pipeline_data import tiny_model, write_data

WORLD = 2
ALL = ("precompute", "offline", "online", "align", "eval", "bf16", "fp16")
MIXED = ("precompute", "bf16", "fp16")  # what the one-process --fsdp reference runs


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    return {"root": root, "train": write_data(root / "train.jsonl", 24, 1), "val": write_data(root / "val.jsonl", 6, 2),
            "proxy": tiny_model(root / "proxy", 0, hidden=24, layers=2),
            "student": tiny_model(root / "student", 1, layers=2)}


def _configs(files: dict[str, Path], out: Path, world: int) -> dict[str, Any]:
    """The stage configs of one pipeline run into `out` (the global batch is the same for every world size)."""
    from proxykd_fast.pipeline import AlignProxyConfig, DistillConfig, EvalConfig, PrecomputeConfig

    fsdp = {"fsdp": world > 1, "progress": False}
    per = 4 // world
    common = dict(learning_rate=1e-3, per_device_train_batch_size=per, eval_data=str(files["val"]), eval_steps=2,
                  eval_batch_size=2, **fsdp)
    return {
        "precompute": PrecomputeConfig(proxy=str(files["proxy"]), data=str(files["train"]), split="0:1", top_k=3,
                                       shard_size=10, batch_size=3, output_dir=str(out / "targets"), **fsdp),
        "offline": DistillConfig(student=str(files["student"]), targets=str(out / "targets"), max_steps=3,
                                 lora={"r": 4, "lora_alpha": 8}, gradient_checkpointing=True, packing=True,
                                 output_dir=str(out / "offline"), **common),
        "online": DistillConfig(student=str(files["student"]), proxy=str(files["proxy"]), data=str(files["train"]),
                                split="0:1", divergence="jsd", max_steps=2, output_dir=str(out / "online"), **common),
        "align": AlignProxyConfig(proxy=str(files["proxy"]), data=str(files["train"]), warmup_split="0:0.5",
                                  align_split="0.5:1", warmup_steps_sft=2, rounds=1, round_steps=2, beta=0.5,
                                  gen_batch_size=5, gen_max_new_tokens=4, output_dir=str(out / "align"),
                                  **{**common, "fsdp": "shard_grad_op" if world > 1 else False}),
        # FSDP2's MixedPrecisionPolicy (bf16 / fp16 compute, fp32 master weights, fp16 loss scaling): compared
        # with the same run on one process under --fsdp
        "bf16": DistillConfig(student=str(files["student"]), targets=str(out / "targets"), max_steps=2,
                              mixed_precision="bf16", output_dir=str(out / "bf16"), **{**common, "fsdp": True}),
        "fp16": DistillConfig(student=str(files["student"]), targets=str(out / "targets"), max_steps=4, fp16=True,
                              alpha=1.0, output_dir=str(out / "fp16"), **{**common, "fsdp": True}),
        "eval": EvalConfig(model=str(files["student"]), reference=str(files["proxy"]), data=str(files["val"]),
                           batch_size=4, num_samples=3, max_new_tokens=4, output=str(out / "eval.json"), **fsdp),
    }


def _pipeline(rank: int, world: int, files: dict[str, Path], out: Path, stages: tuple[str, ...] = ALL) -> None:
    """Run the stages of `_configs` named in `stages` (every process calls this)."""
    from proxykd_fast.pipeline import align_proxy, distill, evaluate, precompute

    cfgs = _configs(files, out, world)
    run = {"precompute": precompute, "eval": evaluate, "align": align_proxy}
    summaries = {name: run.get(name, distill)(cfgs[name]) for name in stages}
    if rank == 0:
        (out / "summaries.json").write_text(json.dumps(summaries, sort_keys=True))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_every_stage_under_fsdp2_equals_the_single_process_run(files: dict[str, Path]) -> None:
    root = files["root"]
    spawn(_pipeline, WORLD, root, files, root / "fsdp")
    spawn(_pipeline, 1, root, files, root / "fsdp1", MIXED)
    with single_process():
        _pipeline(0, 1, files, root / "single", ALL[:-2])
    one, two = root / "single", root / "fsdp"

    # precompute: the same files, byte for byte
    names = sorted(p.name for p in (one / "targets").iterdir())
    assert names == sorted(p.name for p in (two / "targets").iterdir()) and "manifest.json" in names
    for name in names:
        assert (two / "targets" / name).read_bytes() == (one / "targets" / name).read_bytes(), name

    # distill and align-proxy: the same final weights (LoRA merged) and the same held-out NLL
    for stage in ("offline", "online", "align"):
        a, b = _weights(one / stage), _weights(two / stage)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{stage}: {k}")
    s1, s2 = (json.loads((d / "summaries.json").read_text()) for d in (one, two))
    assert s2["offline"]["steps"] == s1["offline"]["steps"] == 3
    assert s2["offline"]["final_eval_nll"] == pytest.approx(s1["offline"]["final_eval_nll"], rel=1e-5)
    assert s2["align"]["final_eval_nll"] == pytest.approx(s1["align"]["final_eval_nll"], rel=1e-5)
    # the sharded proxy sampled the same rejected answers (each prompt chunk under its own seed)
    rejected = [json.loads((d / "align" / "round-1" / "rejected.json").read_text()) for d in (one, two)]
    assert rejected[0] == rejected[1] and len(rejected[0]) == 12

    # mixed precision: 2 processes train as 1 under the same policy (bf16 / fp16 compute, fp32 master weights).
    # The gathered parameters' gradients are bf16 / fp16 sums whose rounding depends on how the batch is split,
    # so the per-step losses, gradient norms and held-out NLL are compared (and Adam's sign-like updates of the
    # tiniest gradients are not).
    from proxykd_fast.pipeline.metrics import read_metrics

    start = _weights(files["student"])
    for stage in ("bf16", "fp16"):
        rows = [read_metrics(d / stage / "metrics.jsonl") for d in (root / "fsdp1", two)]
        for key in ("loss", "grad_norm", "eval_nll"):
            want = [r[key] for r in rows[0] if key in r]
            assert want and [r[key] for r in rows[1] if key in r] == pytest.approx(
                want, rel=1e-3, nan_ok=True), f"{stage}: {key}"
        trained = _weights(two / stage)
        assert all(v.dtype == torch.float32 for v in trained.values())
        assert max(float((trained[k] - start[k]).abs().max()) for k in start) > 1e-4, f"{stage}: no step was taken"
    scaled = read_metrics(two / "fp16" / "metrics.jsonl")
    assert all(r["loss_scale"] >= 1 for r in scaled) and not scaled[-1]["step_skipped"]
    fp32 = read_metrics(one / "offline" / "metrics.jsonl")[0]["loss"]  # the same first batch and weights in fp32
    bf16 = read_metrics(two / "bf16" / "metrics.jsonl")[0]["loss"]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=2e-2)

    # eval: the same numbers and greedy generations
    e1, e2 = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    for key in ("nll", "kl", "tokens", "samples_evaluated", "generations"):
        assert e2[key] == e1[key], key
