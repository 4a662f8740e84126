"""The prior stage and precompute --prior as jobs: kill + resume gives identical files, bad input is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from proxykd_fast.pipeline import PipelineError, PrecomputeConfig, precompute
from proxykd_fast.prior import PriorConfig, build_prior, load_prior
from tests.support.pipeline_data import tiny_model, write_data


class Killed(BaseException):
    """Stands for a kill -9 at a chosen point (never caught by the code under test)."""


def _kill_on_call(monkeypatch: pytest.MonkeyPatch, module: object, name: str, n: int) -> None:
    """Make the n-th call of module.name raise Killed before doing anything (deterministic fault injection)."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage")
    return {"data": write_data(root / "train.jsonl", 26, 1), "proxy": tiny_model(root / "proxy", 0, hidden=24),
            "val": write_data(root / "val.jsonl", 5, 3)}


def test_prior_kill_then_resume_gives_identical_files(world: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from proxykd_fast.prior import build

    cfg = PriorConfig(data=str(world["data"]), tokenizer=str(world["proxy"]), output_dir=str(tmp_path / "full"),
                      shard_size=5, order=3, progress=False)
    full = build_prior(cfg)
    assert full["written"] == 6 and full["num_samples"] == 26
    killed = dataclasses.replace(cfg, output_dir=str(tmp_path / "killed"))
    _kill_on_call(monkeypatch, build, "_atomic_save", 4)  # during the 4th shard
    with pytest.raises(Killed):
        build_prior(killed)
    monkeypatch.undo()
    assert not (tmp_path / "killed" / "prior.json").exists()
    with pytest.raises(FileNotFoundError, match="to completion"):
        load_prior(tmp_path / "killed")
    again = build_prior(dataclasses.replace(killed, resume=True))
    assert again["skipped"] == 3 and again["written"] == 3
    assert _files(tmp_path / "killed") == _files(tmp_path / "full")
    # Smoothing is not a counting option: a resume may change it, the shards are kept.
    other = build_prior(dataclasses.replace(killed, resume=True, smoothing="dirichlet"))
    assert other["skipped"] == 6 and load_prior(tmp_path / "killed").smoothing == "dirichlet"
    with pytest.raises(PipelineError, match="order"):
        build_prior(dataclasses.replace(killed, resume=True, order=2))


def test_precompute_with_prior_kill_then_resume_gives_identical_files(world: dict[str, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    stage = importlib.import_module("proxykd_fast.pipeline.precompute")

    build_prior(PriorConfig(data=str(world["data"]), tokenizer=str(world["proxy"]), output_dir=str(tmp_path / "pr"),
                            progress=False))
    cfg = PrecomputeConfig(proxy=str(world["proxy"]), data=str(world["data"]), output_dir=str(tmp_path / "full"),
                           top_k=4, batch_size=4, shard_size=6, split="0:1", progress=False, prior=str(tmp_path / "pr"),
                           posterior_fit_samples=10)  # kappa and alpha fitted (leave-one-out on the first 10)
    full = precompute(cfg)
    assert full["posterior"]["fitted"] and full["posterior_timing"]["positions"] == 26 * 6
    killed = dataclasses.replace(cfg, output_dir=str(tmp_path / "killed"))
    _kill_on_call(monkeypatch, stage, "write_shard", 3)
    with pytest.raises(Killed):
        precompute(killed)
    monkeypatch.undo()
    assert (tmp_path / "killed" / "posterior_fit.json").exists() and not (tmp_path / "killed" / "manifest.json").exists()
    again = precompute(dataclasses.replace(killed, resume=True))
    assert again["skipped"] == 2 and again["written"] == 3
    assert _files(tmp_path / "killed") == _files(tmp_path / "full")
    with pytest.raises(PipelineError, match="prior_mix"):
        precompute(dataclasses.replace(killed, resume=True, prior_mix=0.5))


def test_bad_input_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no records"):
        build_prior(PriorConfig(data=str(empty), tokenizer=str(world["proxy"]), output_dir=str(tmp_path / "e"),
                                progress=False))
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"prompt": "t1 t2", "completion": "", "finish_reason": "length"}) + "\n")
    with pytest.raises(ValueError, match="no tokens to count"):
        build_prior(PriorConfig(data=str(blank), tokenizer=str(world["proxy"]), output_dir=str(tmp_path / "b"),
                                progress=False))
    with pytest.raises(ValueError, match="'order'"):
        PriorConfig(data="x", tokenizer="y", order=0)
    with pytest.raises(ValueError, match="'smoothing'"):
        PriorConfig(data="x", tokenizer="y", smoothing="kneser")
    with pytest.raises(ValueError, match="'data' is required"):
        build_prior(PriorConfig(tokenizer=str(world["proxy"]), output_dir=str(tmp_path / "r")))
    # A prior counted with another vocabulary than the proxy's.
    other = tiny_model(tmp_path / "other", 0, n_words=30)
    build_prior(PriorConfig(data=str(world["val"]), tokenizer=str(other), output_dir=str(tmp_path / "po"),
                            progress=False))
    base = dict(proxy=str(world["proxy"]), data=str(world["data"]), output_dir=str(tmp_path / "t"), split="0:1",
                progress=False, prior=str(tmp_path / "po"))
    with pytest.raises(PipelineError, match="another vocabulary"):
        precompute(PrecomputeConfig(**base))
    build_prior(PriorConfig(data=str(world["val"]), tokenizer=str(world["proxy"]), output_dir=str(tmp_path / "p8"),
                            max_length=8, progress=False))
    with pytest.raises(PipelineError, match="max_length"):
        precompute(PrecomputeConfig(**{**base, "prior": str(tmp_path / "p8")}))
    for kw, match in (({"posterior": "nope"}, "'posterior'"), ({"posterior": "prior", "prior_strength": 1.0},
                                                              "prior_strength"),
                      ({"posterior": "product", "prior_mix": 0.5}, "prior_mix"),
                      ({"posterior": "product", "prior_strength": 1.5}, "lambda"),
                      ({"prior_strength": 0.0}, "kappa"), ({"prior_mix": -0.1}, "alpha")):
        with pytest.raises(ValueError, match=match):
            PrecomputeConfig(**{**base, **kw})
    without = {k: v for k, v in base.items() if k != "prior"}
    for kw in ({"prior_strength": 1.0}, {"posterior": "product"}, {"posterior_fit_data": "x.jsonl"}):
        with pytest.raises(ValueError, match="need --prior"):
            PrecomputeConfig(**{**without, **kw})


def test_cli_registers_the_prior_stage(world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from proxykd_fast.cli import main

    rc = main(["prior", "--data", str(world["val"]), "--tokenizer", str(world["proxy"]), "--output-dir",
               str(tmp_path / "c"), "--order", "2", "--no-progress"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["order"] == 2
    assert main(["prior", "--data", str(world["val"]), "--tokenizer", str(world["proxy"]), "--order", "0"]) == 2
