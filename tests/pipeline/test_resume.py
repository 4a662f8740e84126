"""Kill-and-resume through the CLI, fresh starts without --resume, and refused resumes with changed options."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from proxykd_fast.pipeline import (
    AlignProxyConfig,
    DistillConfig,
    PipelineError,
    PrecomputeConfig,
    align_proxy,
    distill,
    precompute,
)
from proxykd_fast.pipeline.metrics import read_metrics
from tests.support.pipeline_data import tiny_model, write_data

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    return {"train": write_data(root / "train.jsonl", 24, 1), "val": write_data(root / "val.jsonl", 8, 2),
            "proxy": tiny_model(root / "proxy", 0, hidden=24), "student": tiny_model(root / "student", 1)}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_sigkill_then_resume_matches_an_uninterrupted_run(files: dict[str, Path], tmp_path: Path) -> None:
    steps, every = 80, 10
    opts = dict(student=str(files["student"]), proxy=str(files["proxy"]), data=str(files["train"]), split="0:1",
                alpha=1.0, max_steps=steps, batch_size=3, learning_rate=1e-2, lr_scheduler="linear", warmup_steps=5,
                save_every=every, eval_data=str(files["val"]), eval_every=40, early_stopping_patience=100,
                progress=False)
    argv = [sys.executable, "-m", "proxykd_fast.cli", "distill"]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else ["--no-" + flag[2:]] if v is False else [flag, str(v)]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv + ["--output-dir", str(out)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step-*/manifest.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.005)
    time.sleep(0.05)  # let it run past the checkpoint, so the kill lands mid-run
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "config.json").exists()
    done = subprocess.run(argv + ["--output-dir", str(out), "--resume"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses
    try:
        distill(DistillConfig(output_dir=str(tmp_path / "full"), **opts))
    finally:
        torch.set_num_threads(threads)
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, steps + 1))


def test_distill_without_resume_starts_fresh_and_resume_checks_options(files: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    cfg = DistillConfig(student=str(files["student"]), data=str(files["train"]), split="0:1", alpha=0.0,
                        max_steps=4, batch_size=4, save_every=2, max_steps_this_run=2, progress=False,
                        output_dir=str(tmp_path / "d"))
    distill(cfg)
    assert (tmp_path / "d" / "checkpoints" / "step-2").is_dir()
    with pytest.raises(PipelineError, match="learning_rate"):
        distill(dataclasses.replace(cfg, resume_from_checkpoint=True, learning_rate=0.5))
    res = distill(dataclasses.replace(cfg, max_steps_this_run=1))  # no --resume: starts at step 0 again
    assert res["steps"] == 1 and not (tmp_path / "d" / "checkpoints" / "step-2").exists()


def test_align_without_resume_starts_fresh_and_resume_checks_options(files: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "a"
    cfg = AlignProxyConfig(proxy=str(files["proxy"]), data=str(files["train"]), output_dir=str(out),
                           warmup_split="0:0.5", align_split="0.5:1", warmup_steps_sft=1, rounds=1, round_steps=1,
                           batch_size=4, gen_max_new_tokens=3, progress=False)
    align_proxy(cfg)
    (out / "round-1" / "stale").write_text("from an earlier run")
    assert align_proxy(dataclasses.replace(cfg, resume_from_checkpoint=True))["finished"]  # same options: the phases are reused
    assert (out / "round-1" / "stale").exists()
    with pytest.raises(PipelineError, match="beta"):
        align_proxy(dataclasses.replace(cfg, resume_from_checkpoint=True, beta=0.3))
    align_proxy(dataclasses.replace(cfg, beta=0.3))  # no --resume: every phase is redone
    assert not (out / "round-1" / "stale").exists() and (out / "round-1" / "rejected.json").exists()
    assert json.loads((out / "align_run.json").read_text())["beta"] == 0.3


def test_precompute_without_resume_rewrites_and_resume_checks_run_info(files: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "t"
    cfg = PrecomputeConfig(proxy=str(files["proxy"]), data=str(files["train"]), output_dir=str(out), top_k=3,
                           shard_size=10, split="0:1", progress=False)
    assert precompute(cfg)["written"] == 3
    with pytest.raises(PipelineError, match="top_k"):
        precompute(dataclasses.replace(cfg, resume=True, top_k=4))
    again = precompute(dataclasses.replace(cfg, top_k=4))
    assert again["written"] == 3 and again["skipped"] == 0 and again["top_k"] == 4
    assert precompute(dataclasses.replace(cfg, top_k=4, resume=True))["skipped"] == 3
