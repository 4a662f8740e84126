"""align_proxy on TRL: SFT warm-up, then a round of NLL + DPO whose reference is the proxy at the round's start."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from proxykd_fast.demo.world import build_llama, build_tokenizer
from proxykd_fast.integrations.trl import ProxyDPOConfig, ProxyKDConfig, align_proxy
from tests.support.trl_data import COMMON, sft_rows


def _args(tmp: Path) -> tuple[ProxyKDConfig, ProxyDPOConfig]:
    sft = ProxyKDConfig(str(tmp / "sft"), alpha=0.0, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                        **COMMON)
    dpo = ProxyDPOConfig(str(tmp / "dpo"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                         loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], **COMMON)
    return sft, dpo


def _seq_logps(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return float(logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt):]].sum())


def test_round_reference_is_the_proxy_at_round_start(tmp_path: Path) -> None:
    tok = build_tokenizer(40)
    data = sft_rows(8)
    warm = build_llama(len(tok), 16, 1, 32, 2, 0)
    align_proxy(warm, tok, data, sft_args=_args(tmp_path / "a")[0], dpo_args=_args(tmp_path / "a")[1], rounds=0)
    proxy = build_llama(len(tok), 16, 1, 32, 2, 0)
    sft, dpo = _args(tmp_path / "b")
    res = align_proxy(proxy, tok, data, sft_args=sft, dpo_args=dpo, rounds=1, max_new_tokens=4, seed=3)
    (round1,) = res["rounds"]
    pairs = round1["dataset"]
    assert len(pairs) == 8 and all(r.strip() for r in pairs["rejected"])
    for row in pairs.select(range(3)):  # the warm-started proxy (same seeds) scored the pairs before the round
        assert row["ref_chosen_logps"] == pytest.approx(_seq_logps(warm, row["prompt_ids"], row["chosen_ids"]),
                                                        rel=1e-5)
        assert row["ref_rejected_logps"] == pytest.approx(
            _seq_logps(warm, row["prompt_ids"], row["rejected_ids"]), rel=1e-5)
    moved = any(not torch.equal(p, q) for p, q in zip(proxy.parameters(), warm.parameters()))
    assert moved and {"rewards/margins", "logps/chosen"} <= set(round1["log_history"][0])


def test_align_proxy_checks_its_arguments(tmp_path: Path) -> None:
    tok = build_tokenizer(40)
    sft, dpo = _args(tmp_path)
    model = build_llama(len(tok), 16, 1, 32, 2, 0)
    with pytest.raises(ValueError, match="alpha=0"):
        align_proxy(model, tok, sft_rows(), sft_args=ProxyKDConfig(str(tmp_path), **COMMON), dpo_args=dpo)
    with pytest.raises(ValueError, match="rounds"):
        align_proxy(model, tok, sft_rows(), sft_args=sft, dpo_args=dpo, rounds=-1)
    with pytest.raises(ValueError, match="prompt and completion"):
        align_proxy(model, tok, sft_rows().rename_column("completion", "answer"), sft_args=sft, dpo_args=dpo)
    weighted = copy.deepcopy(dpo)
    weighted.sample_weight_column = "sample_weight"
    with pytest.raises(ValueError, match="sample_weight_column is not supported by align_proxy"):
        align_proxy(model, tok, sft_rows(), sft_args=sft, dpo_args=weighted)
