"""Kill-and-resume (distill through the CLI on one process and on two FSDP2 processes; align-proxy and precompute
on two FSDP2 processes), fresh starts without --resume, and refused resumes with changed options. The kills are
deterministic: every process SIGKILLs itself right after a given checkpoint is on disk (`pipeline.faults`), so
no test races a timer."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
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
from proxykd_fast.pipeline.faults import KILL_AFTER_CHECKPOINT
from proxykd_fast.pipeline.metrics import read_metrics
from tests.support.dist import single_process, spawn
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


def _argv(opts: dict[str, object]) -> list[str]:
    """`proxykd distill` flags for the options."""
    argv = ["distill"]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else ["--no-" + flag[2:]] if v is False else [flag, str(v)]
    return argv


def _assert_same_weights(got: Path, want: Path, atol: float) -> None:
    a, b = _weights(want), _weights(got)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=k)


def test_sigkill_then_resume_matches_an_uninterrupted_run(files: dict[str, Path], tmp_path: Path) -> None:
    steps, every = 40, 10
    opts = dict(student=str(files["student"]), proxy=str(files["proxy"]), data=str(files["train"]), split="0:1",
                alpha=1.0, max_steps=steps, batch_size=3, learning_rate=1e-2, lr_scheduler="linear", warmup_steps=5,
                save_every=every, eval_data=str(files["val"]), eval_every=20, early_stopping_patience=100,
                progress=False)
    argv = [sys.executable, "-m", "proxykd_fast.cli", *_argv(opts)]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # Killed (SIGKILL, no cleanup) right after checkpoint 20 is on disk: a deterministic point mid-run.
    killed = subprocess.run(argv + ["--output-dir", str(out)], env={**env, KILL_AFTER_CHECKPOINT: "distill:20"},
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "config.json").exists()
    done = subprocess.run(argv + ["--output-dir", str(out), "--resume"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "step-20 at step 20" in done.stderr

    with single_process():  # one thread, as in the subprocesses
        distill(DistillConfig(output_dir=str(tmp_path / "full"), **opts))
    _assert_same_weights(out, tmp_path / "full", atol=1e-6)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, steps + 1))


def _cli(rank: int, world: int, argv: list[str]) -> None:
    """`proxykd ...` in a spawned process; a failure fails the spawn."""
    from proxykd_fast.cli import main

    if main(argv) != 0:
        raise SystemExit(f"proxykd {' '.join(argv)} failed")


def test_sigkill_under_two_fsdp_processes_then_resume_matches_one_process(
        files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """Both processes of an FSDP2 distill (online sharded proxy, accumulation, held-out evaluation with best
    weights) are SIGKILLed after checkpoint 6; two new processes resume from it and end where one process does."""
    import torch.multiprocessing as mp

    steps = 9
    opts = dict(student=str(files["student"]), proxy=str(files["proxy"]), data=str(files["train"]), split="0:1",
                alpha=1.0, max_steps=steps, learning_rate=1e-2, lr_scheduler="linear", warmup_steps=2, save_every=3,
                eval_data=str(files["val"]), eval_every=3, early_stopping_patience=100, progress=False)
    sharded = [*_argv({**opts, "batch_size": 1, "grad_accum": 2}), "--fsdp", "--output-dir", str(tmp_path / "fsdp")]
    monkeypatch.setenv(KILL_AFTER_CHECKPOINT, "distill:6")
    with pytest.raises(mp.ProcessExitedException) as killed:
        spawn(_cli, 2, tmp_path, sharded)
    assert killed.value.exit_code == -signal.SIGKILL
    ckpts = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints").iterdir())
    assert ckpts == ["step-3", "step-6"]
    monkeypatch.delenv(KILL_AFTER_CHECKPOINT)
    capfd.readouterr()
    spawn(_cli, 2, tmp_path, [*sharded, "--resume"])
    assert "step-6 at step 6" in capfd.readouterr().err  # the spawned processes write to this test's stderr

    with single_process():
        distill(DistillConfig(output_dir=str(tmp_path / "one"), batch_size=4, **opts))
    _assert_same_weights(tmp_path / "fsdp", tmp_path / "one", atol=1e-5)
    rows = read_metrics(tmp_path / "fsdp" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    want = read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval_nll" in r] == [r["step"] for r in want if "eval_nll" in r] == [3, 6, 9]
    assert [r["eval_nll"] for r in rows if "eval_nll" in r] == pytest.approx(
        [r["eval_nll"] for r in want if "eval_nll" in r], rel=1e-5)


def _stage(rank: int, world: int, stage: str, opts: dict[str, object], result: Path) -> None:
    """align-proxy or precompute with these options in a spawned process; the main one writes the result to
    `result`."""
    cfg = (AlignProxyConfig if stage == "align" else PrecomputeConfig)(**opts)
    res = (align_proxy if stage == "align" else precompute)(cfg)
    if rank == 0:
        result.write_text(json.dumps(res))


def _sigkill_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, opts: dict[str, object],
                  kill: str) -> None:
    """Run `stage` on 2 processes until both SIGKILL themselves right after checkpoint `kill`."""
    import torch.multiprocessing as mp

    monkeypatch.setenv(KILL_AFTER_CHECKPOINT, kill)
    with pytest.raises(mp.ProcessExitedException) as killed:
        spawn(_stage, 2, tmp_path, stage, opts, tmp_path / "killed.json")
    assert killed.value.exit_code == -signal.SIGKILL
    assert not (tmp_path / "killed.json").exists()
    monkeypatch.delenv(KILL_AFTER_CHECKPOINT)


def _resume(tmp_path: Path, stage: str, opts: dict[str, object]) -> dict[str, object]:
    """The result of `stage` resumed on 2 new processes."""
    spawn(_stage, 2, tmp_path, stage, {**opts, "resume": True}, tmp_path / "resumed.json")
    return json.loads((tmp_path / "resumed.json").read_text())


def test_align_sigkilled_in_a_dpo_round_under_two_fsdp_processes_then_resumed_matches_one_process(
        files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """Both processes of an FSDP2 align-proxy (SFT, DPO round 1, then round 2 on answers the sharded proxy sampled;
    accumulation, held-out evaluation) die after checkpoint 2 of round 2; two new processes reuse the finished
    phases and the stored rejected answers, resume the round from its checkpoint and end where one process does."""
    opts = dict(proxy=str(files["proxy"]), data=str(files["train"]), warmup_split="0:0.5", align_split="0.5:1",
                warmup_steps_sft=2, rounds=2, round_steps=4, beta=0.5, keep_round_if_worse=True, gen_batch_size=5,
                gen_max_new_tokens=4, learning_rate=1e-2, lr_scheduler="linear", save_steps=2,
                eval_data=str(files["val"]), eval_steps=2, eval_batch_size=4, progress=False)
    out = tmp_path / "fsdp"
    sharded = {**opts, "fsdp": True, "batch_size": 1, "grad_accum": 2, "output_dir": str(out)}
    _sigkill_both(tmp_path, monkeypatch, "align", sharded, "proxy-dpo-2:2")
    assert (out / "sft" / "final").is_dir() and (out / "round-1" / "final").is_dir()
    assert not (out / "round-2" / "final").exists() and not (out / "config.json").exists()
    assert sorted(p.name for p in (out / "round-2" / "checkpoints").iterdir()) == ["step-2"]
    stored = json.loads((out / "round-2" / "rejected.json").read_text())
    capfd.readouterr()
    assert _resume(tmp_path, "align", sharded)["finished"]
    assert "[proxy-dpo-2] resumed from" in capfd.readouterr().err

    with single_process():
        align_proxy(AlignProxyConfig(output_dir=str(tmp_path / "one"), batch_size=4, **opts))
    one = tmp_path / "one"
    _assert_same_weights(out, one, atol=1e-5)
    for r in (1, 2):  # the same answers sampled by the sharded proxy; the killed round's were read back from disk
        rejected = [json.loads((d / f"round-{r}" / "rejected.json").read_text()) for d in (one, out)]
        assert rejected[0] == rejected[1] and len(rejected[0]) == 12
    assert rejected[1] == stored
    rows = read_metrics(out / "round-2" / "metrics.jsonl")
    want = read_metrics(one / "round-2" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in want] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    got, ref = (json.loads((d / "align_summary.json").read_text()) for d in (out, one))
    assert [p["phase"] for p in got["phases"]] == ["sft", "round-1", "round-2"]
    assert got["final_eval_nll"] == pytest.approx(ref["final_eval_nll"], rel=1e-5)


def test_precompute_sigkilled_after_a_shard_under_two_fsdp_processes_then_resumed_writes_the_same_bytes(
        files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both processes of an FSDP2 precompute die right after shard 2 of 5 is written; two new processes keep the
    two shards, write the other three, the weights and the manifest: the files of one uninterrupted process."""
    opts = dict(proxy=str(files["proxy"]), data=str(files["train"]), split="0:1", top_k=3, shard_size=5,
                batch_size=2, progress=False)
    out = tmp_path / "fsdp"
    sharded = {**opts, "fsdp": True, "output_dir": str(out)}
    _sigkill_both(tmp_path, monkeypatch, "precompute", sharded, "precompute:2")
    assert sorted(p.name for p in out.iterdir()) == ["precompute_run.json", "shard-00000.parquet",
                                                     "shard-00001.parquet"]
    res = _resume(tmp_path, "precompute", sharded)
    assert (res["skipped"], res["written"]) == (2, 3)

    with single_process():
        precompute(PrecomputeConfig(output_dir=str(tmp_path / "one"), **opts))
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in out.iterdir()) == names and "manifest.json" in names
    assert len([n for n in names if n.startswith("shard-")]) == 5
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


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
