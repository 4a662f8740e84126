"""Checkpoints: no unpickling of planted files, retention, verification with fallback, refused empty resumes."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from proxykd_fast.demo.world import build_llama
from proxykd_fast.pipeline import PipelineError
from proxykd_fast.pipeline.align import count_tokens, sft_loss_fn
from proxykd_fast.pipeline.checkpoint import (
    MANIFEST,
    UnsafeCheckpointError,
    _sha256,
    list_checkpoints,
    read_checkpoint,
    rng_state,
    set_rng_state,
)
from proxykd_fast.pipeline.config import TrainConfig
from proxykd_fast.pipeline.data import pad_batch
from proxykd_fast.pipeline.trainer import train

VOCAB = 44
SEQS = [[5 + (i * 7 + j) % 30 for j in range(10)] for i in range(6)]


def _run(out: Path, steps: int, **overrides: Any) -> tuple[torch.nn.Module, Any]:
    """A few SFT steps of a tiny Llama on fixed data, checkpointing every step."""
    model = build_llama(VOCAB, 16, 1, 32, 2, 0)
    opts: dict[str, Any] = dict(batch_size=2, save_every=1, progress=False, output_dir=str(out), learning_rate=1e-2,
                                lr_scheduler="linear")
    cfg = TrainConfig(**{**opts, **overrides})
    res = train(cfg, model, n_train=len(SEQS), make_batch=lambda idx: pad_batch([SEQS[i] for i in idx], [3] * len(idx), 0),
                count_items=count_tokens, loss_fn=sft_loss_fn(None, "torch"), out_dir=out, steps=steps)
    return model, res


class _Planted:
    """Unpickling this object opens (creates) a marker file: the shape of a code-execution payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _plant(ckpt: Path, marker: Path, update_manifest: bool) -> None:
    """Replace rng.pt with a payload (and, for an attacker who knows the format, re-sign the manifest)."""
    torch.save({"python": _Planted(marker), "torch": torch.get_rng_state()}, ckpt / "rng.pt")
    if update_manifest:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        manifest["files"]["rng.pt"] = {"size": (ckpt / "rng.pt").stat().st_size, "sha256": _sha256(ckpt / "rng.pt")}
        (ckpt / MANIFEST).write_text(json.dumps(manifest))


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path: Path) -> None:
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    random.gauss(0, 1)  # a cached Gaussian in Python's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), float(np.random.rand()), float(torch.rand(())), random.gauss(0, 1))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(())), random.gauss(0, 1)) == want


@pytest.mark.parametrize("update_manifest", [False, True], ids=["altered-file", "altered-file-and-manifest"])
def test_a_planted_rng_file_is_refused_and_never_unpickled(tmp_path: Path, update_manifest: bool,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out, marker = tmp_path / "run", tmp_path / "marker"
    _run(out, 3, max_steps_this_run=1)
    (ckpt,) = list_checkpoints(out / "checkpoints")
    _plant(ckpt, marker, update_manifest)
    expected = UnsafeCheckpointError if update_manifest else PipelineError
    with pytest.raises(expected) as info:
        _run(out, 3, resume=True)
    assert not marker.exists(), "the planted file was unpickled"
    message = str(info.value) + capsys.readouterr().err
    assert "rng.pt" in message
    assert ("pickled Python objects" if update_manifest else "where the manifest records") in message
    # The payload is real: a full unpickle (what the loader used to do) runs it.
    torch.load(ckpt / "rng.pt", weights_only=False)
    assert marker.exists()


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path: Path) -> None:
    assert TrainConfig().save_total_limit == 2  # HF Trainer's usual setting
    _run(tmp_path / "two", 5)
    assert [p.name for p in list_checkpoints(tmp_path / "two" / "checkpoints")] == ["step-4", "step-5"]
    _run(tmp_path / "all", 3, save_total_limit=None)
    assert [p.name for p in list_checkpoints(tmp_path / "all" / "checkpoints")] == ["step-1", "step-2", "step-3"]
    with pytest.raises(ValueError, match="save_total_limit"):
        TrainConfig(save_total_limit=0)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the checksum can tell
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _empty, _flip], ids=["truncated", "empty", "flipped-byte"])
def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, damage: Any,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    full, _ = _run(tmp_path / "full", 5)
    out = tmp_path / "run"
    _run(out, 5, max_steps_this_run=3)  # "killed" after step 3: step-2 and step-3 kept
    damage(out / "checkpoints" / "step-3" / "model.pt")
    with pytest.raises(PipelineError, match="model.pt"):
        read_checkpoint(out / "checkpoints" / "step-3")
    capsys.readouterr()
    resumed, res = _run(out, 5, resume=True)
    err = capsys.readouterr().err
    assert "step-3" in err and "model.pt" in err and "falling back to step-2" in err
    assert "resumed from" in err and "at step 2" in err
    assert res.finished and [r["step"] for r in res.history] == [3, 4, 5]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # bit-identical to the uninterrupted run


def test_every_broken_checkpoint_is_reported_and_resume_refused(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _run(out, 5, max_steps_this_run=2)
    for ckpt in list_checkpoints(out / "checkpoints"):
        _empty(ckpt / "optimizer.pt")
    with pytest.raises(PipelineError, match="no intact checkpoint.*2 checkpoint"):
        _run(out, 5, resume=True)
    err = capsys.readouterr().err
    assert "step-2" in err and "step-1" in err and "optimizer.pt" in err


def test_resume_without_any_checkpoint_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(out, 5, max_steps_this_run=2, save_every=0)  # ran, but saved nothing
    with pytest.raises(PipelineError, match="no intact checkpoint.*save-steps"):
        _run(out, 5, resume=True, save_every=0)


def test_resume_of_an_older_checkpoint_without_manifest_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(out, 5, max_steps_this_run=1)
    (out / "checkpoints" / "step-1" / MANIFEST).unlink()  # what proxykd_fast 0.1 wrote: no manifest
    with pytest.raises(PipelineError, match="no intact checkpoint"):
        _run(out, 5, resume=True)


# ----- stage level: run identity and "nothing to resume" -----

@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.support.pipeline_data import tiny_model, write_data

    root = tmp_path_factory.mktemp("ckpt")
    return {"train": write_data(root / "train.jsonl", 12, 1), "student": tiny_model(root / "student", 1)}


def _sft(files: dict[str, Path], output_dir: str, **kw: Any) -> Any:
    from proxykd_fast.pipeline import DistillConfig

    return DistillConfig(student=str(files["student"]), data=str(files["train"]), split="0:1", alpha=0.0,
                         max_steps=4, batch_size=3, save_every=1, learning_rate=1e-2, progress=False,
                         output_dir=output_dir, **kw)


def test_a_respelled_or_moved_run_directory_resumes(files: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from proxykd_fast.pipeline import distill

    distill(_sft(files, str(tmp_path / "full")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text(files["train"].read_text())
    relative = dataclasses.replace(_sft(files, "./run", max_steps_this_run=1), data="data.jsonl")
    assert not distill(relative)["finished"]
    stored = json.loads((tmp_path / "run" / "distill_run.json").read_text())
    assert "output_dir" not in stored and stored["data"] == str(tmp_path / "data.jsonl")
    spelled = dataclasses.replace(relative, output_dir=str(tmp_path / "run"), data=str(tmp_path / "data.jsonl"),
                                  resume_from_checkpoint=True, max_steps_this_run=1)
    assert distill(spelled)["steps"] == 2  # absolute spellings of the same run
    (tmp_path / "run").rename(tmp_path / "moved")
    moved = dataclasses.replace(spelled, output_dir=str(tmp_path / "moved"), max_steps_this_run=0)
    assert distill(moved)["finished"]
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "moved").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_old_run_record_with_output_dir_still_resumes(files: dict[str, Path], tmp_path: Path) -> None:
    from proxykd_fast.pipeline import distill

    cfg = _sft(files, str(tmp_path / "run"), max_steps_this_run=1)
    distill(cfg)
    record = tmp_path / "run" / "distill_run.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "output_dir": "/somewhere/else"}))
    assert distill(dataclasses.replace(cfg, resume_from_checkpoint=True, max_steps_this_run=0))["finished"]


def test_resume_with_nothing_recorded_is_refused(files: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from proxykd_fast.cli import main

    argv = ["distill", "--student", str(files["student"]), "--data", str(files["train"]), "--split", "0:1",
            "--alpha", "0", "--max-steps", "2", "--no-progress", "--output-dir", str(tmp_path / "empty"), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "without --resume" in err
    assert not (tmp_path / "empty" / "checkpoints").exists()


def test_resume_auto_continues_what_there_is_and_otherwise_starts_fresh(files: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from proxykd_fast.pipeline import distill

    out = str(tmp_path / "run")
    first = distill(_sft(files, out, max_steps_this_run=1, resume_from_checkpoint="auto"))
    assert first["steps"] == 1 and "no distill run is recorded" in capsys.readouterr().err
    again = distill(_sft(files, out, max_steps_this_run=1, resume_from_checkpoint="auto"))
    assert again["steps"] == 2 and "resumed from" in capsys.readouterr().err
    for ckpt in list_checkpoints(tmp_path / "run" / "checkpoints"):
        _empty(ckpt / "model.pt")
    restarted = distill(_sft(files, out, max_steps_this_run=1, resume_from_checkpoint="auto"))
    err = capsys.readouterr().err
    assert restarted["steps"] == 1 and "broken" in err and "starts at step 0" in err
