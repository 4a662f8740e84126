"""Smoke test of the demo orchestration (served teacher -> align -> precompute -> 4 students -> report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxykd_fast.demo.default import DemoSettings, run_seed
from proxykd_fast.demo.report import write_outputs


@pytest.mark.slow
def test_demo_miniature_end_to_end(tmp_path: Path) -> None:
    s = DemoSettings(n_words=40, teacher_hidden=16, teacher_layers=1, teacher_steps=20, teacher_batch=16,
                     pretrain_seqs=200, prompt_len=4, answer_len=6, n_train=40, n_val=8, n_eval=16,
                     proxy_sft_steps=4, rounds=1, student_hidden=8, student_layers=1, student_steps=4,
                     batch_size=8, eval_every=2, patience=2)
    res = run_seed(tmp_path, 0, s)
    names = {"sft_only", "proxykd", "proxykd_no_weights", "proxykd_unaligned_proxy", "proxy_aligned",
             "proxy_unaligned"}
    assert set(res["eval"]) == names
    for row in res["eval"].values():
        assert row["kl"] >= 0 and row["nll"] > 0
    md = write_outputs(tmp_path, {0: res}, 0, 1.0)
    assert "Proxy-KD" in md and (tmp_path / "training_curves.png").stat().st_size > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert "verdict" in data and "0" in data["results"]
    # A second run reuses the cached teacher and the collected answers.
    res2 = run_seed(tmp_path, 0, s)
    assert res2["eval"]["sft_only"]["kl"] == pytest.approx(res["eval"]["sft_only"]["kl"], rel=1e-5)


def test_smollm2_split_keeps_each_prompt_on_one_side() -> None:
    from proxykd_fast.demo.smollm2 import prompt_key, split_by_prompt

    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(10)]
    recs = [{"id": str(i), "sample_index": k, "prompt": prompts[i], "completion": f"a{i}.{k}"}
            for i in range(10) for k in range(3)]
    shuffled = recs[::-1]  # collect output is in completion order, not id order
    train, val = split_by_prompt(shuffled, 0.2, seed=0)
    assert len(train) + len(val) == 30 and len(val) == 6
    train_keys, val_keys = {prompt_key(r["prompt"]) for r in train}, {prompt_key(r["prompt"]) for r in val}
    assert not train_keys & val_keys
    assert train == sorted(train, key=lambda r: (int(r["id"]), r["sample_index"]))
    assert split_by_prompt(recs, 0.2, seed=0) == (train, val)  # independent of the input order
    assert split_by_prompt(recs, 0.2, seed=1) != (train, val)
