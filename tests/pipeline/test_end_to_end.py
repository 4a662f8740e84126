"""End-to-end and unit tests of the Proxy-KD pipeline on tiny models (CPU, a few seconds each)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from proxykd_fast.demo.world import build_llama, build_tokenizer
from proxykd_fast.pipeline import (
    AlignProxyConfig,
    DistillConfig,
    PipelineError,
    PrecomputeConfig,
    align_proxy,
    apply_lora,
    check_same_vocab,
    distill,
    precompute,
    sigmoid_weights,
)
from proxykd_fast.pipeline.data import load_records, sft_batch, tokenize_records
from proxykd_fast.pipeline.targets import load_targets
from tests.support.pipeline_data import N_WORDS, tiny_model, write_data


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Data files and tiny proxy / student checkpoints shared by the tests of this module."""
    root = tmp_path_factory.mktemp("pipe")
    return {
        "root": root,
        "train": write_data(root / "train.jsonl", 24, 1),
        "val": write_data(root / "val.jsonl", 8, 2),
        "proxy": tiny_model(root / "proxy0", 0, hidden=24),
        "student": tiny_model(root / "student0", 1),
    }


def test_data_labels_mask_prompt(env: dict[str, Path]) -> None:
    tok = build_tokenizer(N_WORDS)
    ex = tokenize_records(load_records(env["train"]), tok, 64)[:2]
    b = sft_batch(ex, tok.pad_token_id)
    assert ex[0].answer == tok("".join(load_records(env["train"])[0]["completion"]), add_special_tokens=False)["input_ids"]
    # labels[t] is the token at t+1, only over the answer; the prompt is -100.
    assert (b["labels"][0, :3] == -100).all()
    assert b["labels"][0, 3:9].tolist() == b["input_ids"][0, 4:10].tolist()


def test_end_to_end_tiny(env: dict[str, Path], tmp_path: Path) -> None:
    from proxykd_fast.cli import main

    proxy_out = tmp_path / "proxy"
    summary = align_proxy(AlignProxyConfig(
        proxy=str(env["proxy"]), data=str(env["train"]), eval_data=str(env["val"]), output_dir=str(proxy_out),
        warmup_split="0:0.5", align_split="0.5:1", warmup_steps_sft=4, rounds=1, round_steps=2, batch_size=4,
        learning_rate=1e-3, gen_max_new_tokens=6, eval_every=2, progress=False, keep_round_if_worse=True))
    assert summary["finished"] and [p["phase"] for p in summary["phases"]] == ["sft", "round-1"]
    rows = [json.loads(x) for x in (proxy_out / "round-1" / "metrics.jsonl").read_text().splitlines()]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll", "tokens_per_s", "peak_memory_mb"):
        assert key in rows[-1]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(proxy_out)
    targets = tmp_path / "targets"
    rc = main(["precompute", "--proxy", str(proxy_out), "--data", str(env["train"]), "--output-dir", str(targets),
               "--top-k", "5", "--shard-size", "10", "--split", "0:1", "--no-progress"])
    assert rc == 0
    manifest, trows, weights = load_targets(targets)
    assert manifest["num_samples"] == 24 and len(manifest["shards"]) == 3 and len(weights) == 24
    assert trows[0].topk_ids.shape == (6, 5)
    student_out = tmp_path / "student"
    rc = main(["distill", "--student", str(env["student"]), "--targets", str(targets), "--output-dir",
               str(student_out), "--max-steps", "3", "--batch-size", "4", "--alpha", "1", "--no-weights",
               "--eval-data", str(env["val"]), "--eval-every", "1", "--no-progress"])
    assert rc == 0
    rows = [json.loads(x) for x in (student_out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"loss", "nll", "kd", "weight_mean", "eval_nll"} <= set(rows[-1])
    out_json = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(student_out), "--data", str(env["val"]), "--reference", str(proxy_out),
               "--output", str(out_json), "--num-samples", "2", "--max-new-tokens", "4", "--no-progress"])
    assert rc == 0
    res = json.loads(out_json.read_text())
    assert res["kl"] > 0 and res["nll"] > 0 and len(res["generations"]) == 2


def test_sft_only_and_online_proxy(env: dict[str, Path], tmp_path: Path) -> None:
    base = dict(student=str(env["student"]), data=str(env["train"]), split="0:1", max_steps=2, batch_size=4,
                progress=False)
    assert distill(DistillConfig(output_dir=str(tmp_path / "sft"), alpha=0.0, **base))["finished"]
    res = distill(DistillConfig(output_dir=str(tmp_path / "online"), proxy=str(env["proxy"]), alpha=1.0, **base))
    assert res["finished"]
    rows = [json.loads(x) for x in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kd"] > 0 and 0 < rows[-1]["weight_mean"] < 1


def _state(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_resume_gives_identical_weights(env: dict[str, Path], tmp_path: Path) -> None:
    targets = tmp_path / "targets"
    precompute(PrecomputeConfig(proxy=str(env["proxy"]), data=str(env["train"]), output_dir=str(targets), top_k=4,
                                split="0:1", progress=False))
    base = dict(student=str(env["student"]), targets=str(targets), max_steps=6, batch_size=5, alpha=2.0,
                save_every=2, progress=False, learning_rate=1e-2, lr_scheduler="linear", warmup_steps=2,
                eval_data=str(env["val"]), eval_every=2, early_stopping_patience=10)
    full = tmp_path / "full"
    distill(DistillConfig(output_dir=str(full), **base))
    part = tmp_path / "part"
    res = distill(DistillConfig(output_dir=str(part), max_steps_this_run=3, **base))  # "crash" after step 3
    assert not res["finished"] and not (part / "config.json").exists()
    assert distill(DistillConfig(output_dir=str(part), resume=True, **base))["finished"]
    a, b = _state(full), _state(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_vocab_mismatch_is_refused(env: dict[str, Path], tmp_path: Path) -> None:
    other = tiny_model(tmp_path / "other", 3, n_words=N_WORDS + 3)
    with pytest.raises(PipelineError, match="vocabular"):
        check_same_vocab(build_tokenizer(N_WORDS), build_tokenizer(N_WORDS + 3))
    targets = tmp_path / "targets"
    precompute(PrecomputeConfig(proxy=str(env["proxy"]), data=str(env["train"]), output_dir=str(targets), top_k=3,
                                split="0:1", progress=False))
    with pytest.raises(PipelineError, match="shared vocabulary"):
        distill(DistillConfig(student=str(other), targets=str(targets), output_dir=str(tmp_path / "s"), max_steps=1,
                              progress=False))
    with pytest.raises(PipelineError, match="shared vocabulary"):
        distill(DistillConfig(student=str(other), proxy=str(env["proxy"]), data=str(env["train"]),
                              output_dir=str(tmp_path / "s2"), max_steps=1, progress=False))


def test_lora_on_lm_head_is_refused() -> None:
    model = build_llama(44, 16, 1, 32, 2, 0)
    with pytest.raises(PipelineError, match="lm_head"):
        apply_lora(model, {"r": 2, "target_modules": ["q_proj", "lm_head"]})
    peft_model = apply_lora(build_llama(44, 16, 1, 32, 2, 0), {"r": 2, "target_modules": ["q_proj", "v_proj"]})
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_softcapping_is_refused() -> None:
    from proxykd_fast.pipeline.modeling import check_supported

    model = build_llama(44, 16, 1, 32, 2, 0)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(PipelineError, match="softcapping"):
        check_supported(model)


def test_precompute_resumes_and_standardizes(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t"
    cfg = PrecomputeConfig(proxy=str(env["proxy"]), data=str(env["train"]), output_dir=str(out), top_k=4,
                           shard_size=10, split="0:1", progress=False, format="safetensors")
    first = precompute(cfg)
    assert first["written"] == 3 and first["skipped"] == 0
    before = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").unlink()  # as if killed before this shard was written
    second = precompute(dataclasses.replace(cfg, resume=True))
    assert second["written"] == 1 and second["skipped"] == 2
    _, rows, weights = load_targets(out)
    assert (out / "shard-00001.safetensors").read_bytes() == before
    assert len(rows) == 24 and [r.index for r in rows] == list(range(24))
    ll = torch.tensor([r.loglik for r in rows], dtype=torch.float64)
    z = (ll - ll.mean()) / ll.std(unbiased=False)
    expect = torch.sigmoid(z).float()
    got = torch.tensor([weights[r.index] for r in rows])
    torch.testing.assert_close(got, expect)
    nt = torch.tensor([r.n_tokens for r in rows])
    norm = sigmoid_weights(ll, nt, "mean", normalize=True)
    assert abs(float(norm.mean()) - 1) < 1e-5


def test_yaml_config_and_flag_override(tmp_path: Path) -> None:
    from proxykd_fast.cli import parse_command
    from proxykd_fast.pipeline.config import DistillConfig

    cfg_path = tmp_path / "d.yaml"
    cfg_path.write_text("student: s\ntargets: t\nalpha: 3.0\nlora: {r: 4}\nmax_steps: 9\n")
    cfg = DistillConfig.from_yaml(cfg_path)
    assert cfg.alpha == 3.0 and cfg.lora == {"r": 4} and cfg.max_steps == 9
    name, cfg = parse_command(["distill", "--config", str(cfg_path), "--alpha", "0.5", "--no-weights"])
    assert name == "distill" and isinstance(cfg, DistillConfig)
    assert cfg.alpha == 0.5 and cfg.use_weights is False and cfg.max_steps == 9 and cfg.student == "s"
    cfg_path.write_text("studnet: s\n")
    with pytest.raises(ValueError, match="unknown"):
        DistillConfig.from_yaml(cfg_path)


def test_lora_distill_saves_merged_model(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "lora"
    res = distill(DistillConfig(student=str(env["student"]), data=str(env["train"]), alpha=0.0, max_steps=2,
                                batch_size=4, learning_rate=1e-2, lora={"r": 2, "target_modules": ["q_proj", "v_proj"]},
                                output_dir=str(out), progress=False))
    assert res["finished"]
    merged = _state(out)
    assert not any("lora" in k for k in merged)
    base = _state(env["student"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])
