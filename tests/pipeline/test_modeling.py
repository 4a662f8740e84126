"""Model heads: tied embeddings, logit scales (Cohere, Granite) and softcapping (Gemma-2, Gemma-3) on tiny configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from proxykd_fast.losses import linear_cross_entropy
from proxykd_fast.pipeline.modeling import (
    HiddenAndHead,
    PipelineError,
    check_head_matches_logits,
    check_supported,
    head_params,
    logit_scale,
)

SIZES = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    hidden, w, b = HiddenAndHead(model)(ids, torch.ones_like(ids))
    return hidden @ w.t() + (0 if b is None else b)


def test_tied_embeddings_loss_and_gradients_match_the_model() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **SIZES))
    w, _ = head_params(model)
    assert w is model.get_input_embeddings().weight
    ids = torch.randint(3, 40, (2, 7))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    want = F.cross_entropy(model(input_ids=ids).logits.reshape(-1, 40), labels.reshape(-1))
    want.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden, w, b = HiddenAndHead(model)(ids, torch.ones_like(ids))
    got = linear_cross_entropy(hidden, w, labels, bias=b, backend="torch")
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():  # the tied weight gets both its input and output gradient
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_cohere_logit_scale_is_applied() -> None:
    from transformers import CohereConfig, CohereForCausalLM

    model = CohereForCausalLM(CohereConfig(logit_scale=0.25, **SIZES)).eval()
    assert logit_scale(model) == 0.25
    ids = torch.randint(3, 40, (1, 6))
    torch.testing.assert_close(_logits(model, ids), model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    check_head_matches_logits(model)


def test_granite_logits_scaling_is_applied() -> None:
    from transformers import GraniteConfig, GraniteForCausalLM

    model = GraniteForCausalLM(GraniteConfig(logits_scaling=4.0, **SIZES)).eval()
    assert logit_scale(model) == 0.25
    ids = torch.randint(3, 40, (1, 6))
    torch.testing.assert_close(_logits(model, ids), model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    check_head_matches_logits(model)
    model.config.logits_scaling = 0.0
    with pytest.raises(PipelineError, match="logits_scaling"):
        check_supported(model)


def test_softcapping_is_refused_top_level_and_nested() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3Config

    gemma2 = Gemma2ForCausalLM(Gemma2Config(head_dim=8, final_logit_softcapping=30.0, **SIZES))
    with pytest.raises(PipelineError, match="final_logit_softcapping"):
        check_supported(gemma2)
    with pytest.raises(PipelineError, match="softcapping"):
        HiddenAndHead(gemma2)

    class Multimodal(torch.nn.Module):  # stands in for Gemma3ForConditionalGeneration: only its config matters
        config = Gemma3Config(text_config=dict(final_logit_softcapping=30.0, head_dim=8, **SIZES))

    with pytest.raises(PipelineError, match="text_config.final_logit_softcapping"):
        check_supported(Multimodal())


def test_unknown_logit_post_processing_is_caught_by_the_probe() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.support.tiny_lm import doubled_logits_llama

    torch.manual_seed(0)
    with pytest.raises(PipelineError, match="logits differ"):
        check_head_matches_logits(doubled_logits_llama(LlamaConfig(**SIZES)))
    check_head_matches_logits(LlamaForCausalLM(LlamaConfig(**SIZES)))
