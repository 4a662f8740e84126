"""benchmarks/memory_plan.py: its plan of a training step agrees with a measured FSDP2 step on 2 gloo processes.

The measurement is the trainer's own step (`trainer.training_step`: fused CE inside the root unit's
forward, backward, clipping, AdamW) of a tiny Llama sharded by the stages' `sharding.shard`, its second
step (the optimizer state exists, as in every step but the first), with every tensor allocation tracked
by torch's MemTracker. The plan sees only the model's config and the flags.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.support.dist import spawn

REPO = Path(__file__).resolve().parents[2]
TINY = dict(vocab=2048, hidden=64, layers=2, intermediate=128, heads=4)
BATCH, SEQ = 4, 128
CASES = [("no", False), ("no", True), ("bf16", False), ("bf16", True)]  # (mixed precision, checkpointing)


def memory_plan():
    if "memory_plan" not in sys.modules:
        spec = importlib.util.spec_from_file_location("memory_plan", REPO / "benchmarks" / "memory_plan.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["memory_plan"] = module
        spec.loader.exec_module(module)
    return sys.modules["memory_plan"]


def _measure(rank: int, world: int, out: str) -> None:
    """Peak tracked bytes of the second training step, per case, written by rank 0."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from proxykd_fast.demo.world import build_llama
    from proxykd_fast.losses._gemm import release_workspace
    from proxykd_fast.pipeline.align import sft_loss_fn
    from proxykd_fast.pipeline.bootstrap import make_accelerator
    from proxykd_fast.pipeline.config import TrainConfig
    from proxykd_fast.pipeline.data import count_tokens
    from proxykd_fast.pipeline.modeling import HiddenAndHead
    from proxykd_fast.pipeline.sharding import shard
    from proxykd_fast.pipeline.trainer import enable_gradient_checkpointing, training_step

    acc = make_accelerator()
    g = torch.Generator().manual_seed(rank)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, TINY["vocab"], (BATCH, SEQ), generator=g)
        labels = ids.roll(-1, 1)
        labels[:, -1] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    peaks = {}
    for mp, ckpt in CASES:
        cfg = TrainConfig(fsdp=True, mixed_precision=mp, gradient_checkpointing=ckpt, progress=False)
        model = build_llama(TINY["vocab"], TINY["hidden"], TINY["layers"], TINY["intermediate"], TINY["heads"], 0)
        if ckpt:
            enable_gradient_checkpointing(model)
        wrapper = HiddenAndHead(model)
        shard(wrapper, acc, cfg, train=True)
        wrapper.train()
        opt = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        step = (acc, wrapper, None, count_tokens, sft_loss_fn(None, "torch"), opt, sched, None, 1.0)
        training_step(*step[:2], [batches[0]], *step[3:])
        release_workspace()  # allocated again inside the measured step, as on a GPU at every call
        tracker = MemTracker()
        tracker.track_external(wrapper, opt)
        with tracker:
            training_step(*step[:2], [batches[1]], *step[3:])
        peak = tracker.get_tracker_snapshot("peak")
        peaks[f"{mp},{ckpt}"] = sum(s["Total"] for s in peak.values())
    if rank == 0:
        Path(out).write_text(json.dumps(peaks))


def test_plan_agrees_with_a_measured_fsdp2_step(tmp_path: Path) -> None:
    mp_plan = memory_plan()
    spawn(_measure, 2, tmp_path, str(tmp_path / "peaks.json"))
    measured = json.loads((tmp_path / "peaks.json").read_text())
    from proxykd_fast.demo.world import build_llama

    config = build_llama(TINY["vocab"], TINY["hidden"], TINY["layers"], TINY["intermediate"], TINY["heads"], 0).config
    shape = mp_plan.shape_of(config, "tiny")
    report = {}
    for mp, ckpt in CASES:
        flags = mp_plan.Flags(world=2, fsdp=True, mixed_precision=mp, dtype="float32", gradient_checkpointing=ckpt,
                              device="cpu")
        planned = mp_plan.plan_train(shape, flags, BATCH * SEQ, SEQ, "ce")["peak"]
        report[(mp, ckpt)] = (planned, measured[f"{mp},{ckpt}"])
    for planned, got in report.values():
        assert planned == pytest.approx(got, rel=0.25), report
    # checkpointing saves memory in the plan as in the measurement
    assert report[("no", True)][1] < report[("no", False)][1] and report[("no", True)][0] < report[("no", False)][0]


def test_paper_models_from_their_configs() -> None:
    """The meta-device models have the published sizes; the plan's verdicts follow from them."""
    mp_plan = memory_plan()
    shapes = {n: mp_plan.shape_of(mp_plan.load_config(n), n) for n in ("llama-2-7b", "llama-2-13b", "llama-2-70b")}
    assert [round(s.params / 1e9, 2) for s in shapes.values()] == [6.74, 13.02, 68.98]
    seven, seventy = shapes["llama-2-7b"], shapes["llama-2-70b"]
    assert seventy.kv_dim == 8 * 128 and seven.kv_dim == 4096  # 70B's grouped-query attention
    flags = mp_plan.Flags(world=8, fsdp=True, gradient_checkpointing=True, lora=True)
    dpo = mp_plan.plan_stage("align-proxy (SFT / DPO step)", seventy, seven, flags, 1024)
    assert mp_plan.fits(dpo["peak"], 80) and not mp_plan.fits(dpo["peak"], 40)
    full = mp_plan.plan_stage("align-proxy (SFT / DPO step)", seventy, seven, dataclasses.replace(flags, lora=False),
                              1024)
    assert not mp_plan.fits(full["peak"], 80)  # full fine-tuning of the 70B proxy needs more than 8 x 80 GB
    one = mp_plan.plan_stage("precompute", seventy, seven, dataclasses.replace(flags, world=1, fsdp=False), 1024)
    assert not mp_plan.fits(one["peak"], 80)  # the proxy does not fit one device: precompute must shard it
    # sharding divides the parameters; checkpointing keeps one input per layer instead of every activation
    two = mp_plan.plan_train(seven, mp_plan.Flags(world=2, fsdp=True), 1024, 1024, "ce")
    eight = mp_plan.plan_train(seven, mp_plan.Flags(world=8, fsdp=True), 1024, 1024, "ce")
    assert two["parameters"] == pytest.approx(4 * eight["parameters"], rel=1e-6)
    ckpt = mp_plan.plan_train(seven, mp_plan.Flags(world=8, fsdp=True, gradient_checkpointing=True), 1024, 1024, "ce")
    assert ckpt["activations"] < eight["activations"] / 5
    # the fused loss's chunks follow the losses' own workspace rule and undercut materialised logits
    fused = sum(mp_plan.loss_workspace(seven.vocab, 8192, "ce", "cuda", 2))
    assert fused < mp_plan.naive_logits(seven, 8192, "ce", 2) / 2


def test_the_script_prints_the_paper_setting(capsys: pytest.CaptureFixture[str]) -> None:
    memory_plan().main(["--markdown"])
    out = capsys.readouterr().out
    assert "8 x 80 GB" in out and "| precompute |" in out and "naive logits" in out
