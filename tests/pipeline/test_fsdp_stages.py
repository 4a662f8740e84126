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

from tests.support.distributed import single_process, spawn
from tests.support.pipeline_data import tiny_model, write_data

WORLD = 2


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
        "eval": EvalConfig(model=str(files["student"]), reference=str(files["proxy"]), data=str(files["val"]),
                           batch_size=4, num_samples=3, max_new_tokens=4, output=str(out / "eval.json"), **fsdp),
    }


def _pipeline(files: dict[str, Path], out: Path, world: int) -> None:
    """Run every stage of `_configs` (all processes call this)."""
    import torch.distributed as dist

    from proxykd_fast.pipeline import align_proxy, distill, evaluate, precompute

    cfgs = _configs(files, out, world)
    precompute(cfgs["precompute"])
    summaries = {"offline": distill(cfgs["offline"]), "online": distill(cfgs["online"]),
                 "align": align_proxy(cfgs["align"])}
    evaluate(cfgs["eval"])
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / "summaries.json").write_text(json.dumps(summaries, sort_keys=True))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_every_stage_under_fsdp2_equals_the_single_process_run(files: dict[str, Path]) -> None:
    root = files["root"]
    spawn(_pipeline, WORLD, root, files, root / "fsdp", WORLD)
    with single_process():
        _pipeline(files, root / "single", 1)
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

    # eval: the same numbers and greedy generations
    e1, e2 = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    for key in ("nll", "kl", "tokens", "samples_evaluated", "generations"):
        assert e2[key] == e1[key], key
