"""Smoke test of the demo orchestration (served teacher -> align -> precompute -> 4 students -> report)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from proxykd_fast.demo.default import MAIN_ROWS, UNEVEN_ROWS, DemoSettings, run_seed
from proxykd_fast.demo.report import write_outputs


@pytest.mark.slow
def test_demo_miniature_end_to_end(tmp_path: Path) -> None:
    s = DemoSettings(n_words=40, teacher_hidden=16, teacher_layers=1, teacher_steps=20, teacher_batch=16,
                     pretrain_seqs=200, prompt_len=4, answer_len=6, n_train=40, n_val=8, n_eval=16,
                     proxy_sft_steps=4, rounds=1, student_hidden=8, student_layers=1, student_steps=4,
                     batch_size=8, eval_every=2, patience=2)
    res = run_seed(tmp_path, 0, s)
    assert set(res["eval"]) == set(MAIN_ROWS) | {"proxy_aligned", "proxy_unaligned", "proxy_sft"}
    for row in res["eval"].values():
        assert row["kl"] >= 0 and row["nll"] > 0
    assert set(res["targets_kl"]) == {"prior", "proxy_sft", "proxy_aligned", "posterior"}
    assert all(v >= 0 for v in res["targets_kl"].values())
    # The proxy's target KL is the KL its own held-out evaluation reports (two computations of one number).
    assert res["targets_kl"]["proxy_aligned"] == pytest.approx(res["eval"]["proxy_aligned"]["kl"], rel=1e-4)
    assert res["posterior_fit"]["fit_samples_in_prior"] == 0  # fitted on the held-out validation answers
    md = write_outputs(tmp_path, {0: res}, 0, 1.0)
    assert "Proxy-KD" in md and "Bayesian (v1): posterior" in md and "Target quality" in md
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert "verdict" in data and "0" in data["results"]
    # A second run reuses the cached teacher and the collected answers.
    res2 = run_seed(tmp_path, 0, s)
    assert res2["eval"]["sft_only"]["kl"] == pytest.approx(res["eval"]["sft_only"]["kl"], rel=1e-5)
    reused = run_seed(tmp_path, 0, s, reuse=True)  # read back from run_result.json, nothing rerun
    assert reused["eval"] == json.loads(json.dumps(res2["eval"]))
    from proxykd_fast.demo.sweep import alpha_sweep, sweep_table

    sweep = alpha_sweep(tmp_path, 0, s, [0.5, 2.0], ("aligned", "posterior"))
    assert len(sweep) == 4 and all(r["kl"] >= 0 and r["grad_norm_step1"] > 0 for r in sweep.values())
    assert "posterior" in sweep_table(sweep)
    assert alpha_sweep(tmp_path, 0, s, [2.0], ("posterior",), reuse=True) == {"posterior/2": sweep["posterior/2"]}
    # The uneven-alignment variant: its own pre-trained proxy, the same teacher data, only its rows.
    uneven = dataclasses.replace(s, missing_contexts=0.3, variant="uneven")
    res3 = run_seed(tmp_path, 0, uneven, rows=UNEVEN_ROWS)
    assert set(res3["eval"]) == set(UNEVEN_ROWS) | {"proxy_aligned", "proxy_unaligned"}
    assert (tmp_path / "cache" / "seed0" / "proxy_pretrained_missing0.3" / "config.json").exists()
    assert (tmp_path / "seed0" / "uneven" / "proxykd" / "config.json").exists()


def test_skipped_contexts_get_no_pretraining_loss() -> None:
    import numpy as np
    import torch

    from proxykd_fast.demo.default import skipped_contexts
    from proxykd_fast.demo.world import OFFSET, build_llama, pretrain

    skip = skipped_contexts(DemoSettings(n_words=40, missing_contexts=0.25), 0)
    assert len(skip) == 10 and len(set(skip.tolist())) == 10
    assert not len(skipped_contexts(DemoSettings(n_words=40), 0))
    seqs = np.tile(np.asarray([[int(skip[0])] * 6]), (4, 1))  # every context is a skipped one: no loss at all
    model = build_llama(40 + OFFSET, 8, 1, 16, 2, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = pretrain(model, seqs, 2, 4, 1e-2, 0, "t", skip_contexts=skip)
    assert all(loss == 0 for loss in losses)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


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
