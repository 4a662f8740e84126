"""fuse_lm_head / hidden_and_head against the unpatched model: same loss and gradients, generation unchanged."""

from __future__ import annotations

import pytest
import torch

from proxykd_fast.integrations.hf import (
    UnsupportedModelError,
    fuse_lm_head,
    head_params,
    hidden_and_head,
    is_fused,
    unfuse_lm_head,
)
from tests.support.tiny_lm import ARCHS, batch, build, doubled_logits_llama, grads


def _reference(model: torch.nn.Module, b: dict, **kw: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The unpatched model's own loss (HF's ForCausalLMLoss on full logits) and its gradients."""
    model.zero_grad(set_to_none=True)
    loss = model(**b, **kw).loss
    loss.backward()
    return loss.detach(), grads(model)


def _fused(model: torch.nn.Module, b: dict, **kw: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**b, **kw)
    assert out.logits is None
    out.loss.backward()
    return out.loss.detach(), grads(model)


def _assert_same(got: tuple, want: tuple) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_gradients_match_the_unpatched_model(arch: str) -> None:
    model = build(arch)
    b = batch()
    want = _reference(model, b)
    assert fuse_lm_head(model, backend="torch") is model and is_fused(model)
    _assert_same(_fused(model, b), want)


def test_gpt2_head_is_the_tied_embedding() -> None:
    model = build("gpt2")
    w, bias = head_params(model)
    assert w is model.transformer.wte.weight and bias is None
    h, w2, _ = hidden_and_head(model, batch()["input_ids"])
    assert w2 is w and h.shape == (3, 9, 16)


@pytest.mark.parametrize("num_items", [7, torch.tensor(11)])
def test_num_items_in_batch_divides_the_summed_loss(num_items: int | torch.Tensor) -> None:
    model = build("llama")
    b = batch()
    want = _reference(model, b, num_items_in_batch=num_items)
    fuse_lm_head(model, backend="torch")
    _assert_same(_fused(model, b, num_items_in_batch=num_items), want)


def test_shift_labels_are_used_as_given() -> None:
    model = build("qwen2")
    b = batch()
    shifted = torch.cat([b["labels"][:, 1:], torch.full((3, 1), -100)], dim=1)
    want = _reference(model, b)
    fuse_lm_head(model, backend="torch")
    inputs = {k: v for k, v in b.items() if k != "labels"}
    _assert_same(_fused(model, inputs, shift_labels=shifted), want)


def test_peft_lora_model() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for n, p in model.named_parameters():  # non-zero B so the adapters matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    b = batch()
    want = _reference(model, b)
    assert fuse_lm_head(model, backend="torch") is model
    got = _fused(model, b)
    assert any("lora" in n for n in got[1])
    _assert_same(got, want)
    unfuse_lm_head(model)
    assert model(**b).logits.shape == (3, 9, 48)


def test_lora_on_the_head_is_refused() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UnsupportedModelError, match="lm_head"):
        fuse_lm_head(model)


def test_gradient_checkpointing() -> None:
    model = build("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b = batch()
    want = _reference(model, b)
    fuse_lm_head(model, backend="torch")
    _assert_same(_fused(model, b), want)


def test_without_labels_the_forward_and_generation_are_unchanged() -> None:
    model = build("llama")
    b = batch()
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    greedy = model.generate(b["input_ids"][:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    fuse_lm_head(model)
    torch.testing.assert_close(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, logits)
    assert torch.equal(model.generate(b["input_ids"][:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0),
                       greedy)


def test_tuple_output_and_unfuse() -> None:
    model = build("llama")
    b = batch()
    fuse_lm_head(model, backend="torch")
    fuse_lm_head(model, backend="torch", chunk_size=4)  # re-fusing replaces the options
    out = model(**b, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0
    unfuse_lm_head(model)
    assert not is_fused(model) and "forward" not in model.__dict__
    assert model(**b).logits.shape == (3, 9, 48)
    with pytest.raises(ValueError, match="no fused head"):
        unfuse_lm_head(model)


def test_a_deep_copy_of_a_fused_model_runs_on_its_own_weights() -> None:
    import copy

    model = fuse_lm_head(build("llama"), backend="torch")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.mul_(3.0)
    b = batch()
    want = _reference(unfuse_lm_head(copy.deepcopy(clone)), b)
    _assert_same(_fused(clone, b), want)
    assert not torch.allclose(model(**b).loss, clone(**b).loss)


def test_autocast_of_a_prepared_model_applies_to_the_hidden_states() -> None:
    """The bug users hit: the backbone called directly skips the autocast that accelerate put on forward."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = build("llama")
    b = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(**b).loss.float()
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one process-wide state
    try:
        prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert model.model(input_ids=b["input_ids"]).last_hidden_state.dtype == torch.float32  # the hand-written glue
    hidden, weight, _ = hidden_and_head(prepared, b["input_ids"], b["attention_mask"])
    assert hidden.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16  # what the head's matmul sees
    h32, w32, _ = hidden_and_head(prepared, b["input_ids"], b["attention_mask"], head_dtype="weight")
    assert w32 is model.lm_head.weight and h32.dtype == torch.float32  # TRL's cast_lm_head_to_fp32
    torch.testing.assert_close(h32.to(torch.bfloat16), hidden, rtol=0, atol=0)  # the same hidden, not rounded
    fuse_lm_head(prepared, backend="torch")
    loss = prepared(**b).loss
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=0)
    with pytest.raises(ValueError, match="head_dtype"):
        fuse_lm_head(prepared, head_dtype="fp8")


def test_softcapping_is_refused() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tests.support.tiny_lm import SIZES

    model = Gemma2ForCausalLM(Gemma2Config(head_dim=8, final_logit_softcapping=30.0, **SIZES))
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping"):
        fuse_lm_head(model)
    with pytest.raises(UnsupportedModelError, match="softcapping"):
        hidden_and_head(model, batch()["input_ids"])
    model.config.final_logit_softcapping = None  # Gemma-2 without it is plain hidden @ W.T
    fuse_lm_head(model)


def test_unknown_logit_post_processing_is_caught_by_the_probe() -> None:
    model = doubled_logits_llama(build("llama").config)
    with pytest.raises(UnsupportedModelError, match="logits differ"):
        fuse_lm_head(model)
    assert not is_fused(model)


def test_a_forward_that_bypasses_the_head_module_is_refused() -> None:
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class Direct(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):  # type: ignore[no-untyped-def]
            h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return CausalLMOutputWithPast(logits=h @ self.lm_head.weight.t())

    model = Direct(build("llama").config)
    with pytest.raises(UnsupportedModelError, match="never called its output head"):
        hidden_and_head(model, batch()["input_ids"])
    assert "forward" not in model.lm_head.__dict__  # the head is restored


def test_bad_options() -> None:
    model = build("llama")
    with pytest.raises(ValueError, match="backend"):
        fuse_lm_head(model, backend="cuBLAS")
    with pytest.raises(ValueError, match="chunk_size"):
        fuse_lm_head(model, chunk_size=0)
    with pytest.raises(TypeError, match="nn.Module"):
        fuse_lm_head("llama")  # type: ignore[arg-type]
    fuse_lm_head(model, backend="torch")
    with pytest.raises(ValueError, match="labels have shape"):
        model(input_ids=torch.ones(2, 5, dtype=torch.long), labels=torch.ones(2, 4, dtype=torch.long))


def test_hf_trainer_with_gradient_accumulation_matches_the_unpatched_model(tmp_path) -> None:
    """Trainer passes num_items_in_batch to the fused forward: two steps of accumulation 2 give the same weights."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    b = batch(rows=8, width=9, seed=3)
    rows = [{k: v[i].tolist() for k, v in b.items()} for i in range(8)]

    def run(fused: bool) -> dict[str, torch.Tensor]:
        model = build("llama")
        if fused:
            fuse_lm_head(model, backend="torch")
        args = TrainingArguments(output_dir=str(tmp_path / str(fused)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, report_to=[],
                                 use_cpu=True, save_strategy="no", logging_steps=1, seed=0, data_seed=0,
                                 lr_scheduler_type="constant", disable_tqdm=True, optim="sgd")
        Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows)).train()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    want, got = run(False), run(True)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
