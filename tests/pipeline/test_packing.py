"""Padding-free packing (--packing) and the attention implementations (--attn-implementation).

A packed batch runs its samples concatenated in one row with position ids restarting per sample; the
per-sample losses and their gradients equal the padded batch's, for sdpa and eager, which they would
not if attention crossed a sample boundary (the control: the same concatenation scored as one
sequence). flash_attention_2 is refused up front where it is not installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from proxykd_fast.demo.world import build_llama
from proxykd_fast.losses import sequence_log_probs
from proxykd_fast.pipeline.data import pad_batch
from proxykd_fast.pipeline.modeling import HiddenAndHead, PipelineError, load_model, pack_batch
from tests.support.pipeline_data import tiny_model

VOCAB = 37


def _batch() -> dict[str, torch.Tensor]:
    """4 samples of 11, 3, 8 and 1 tokens (the last has no answer token), prompts of 2."""
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (11, 3, 8, 1)]
    return pad_batch(seqs, [min(2, len(s)) for s in seqs], 0)


def _per_sample(model: torch.nn.Module, packing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample summed log-likelihoods and the gradient of their sum."""
    b = _batch()
    model.zero_grad(set_to_none=True)
    ll = HiddenAndHead(model, packing=packing)(
        b["input_ids"], b["attention_mask"], head_fn=lambda h, w, bias: sequence_log_probs(h, w, b["labels"]))
    ll.sum().backward()
    return ll.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_the_same_per_sample_losses(attn: str) -> None:
    model = build_llama(VOCAB, 16, 2, 32, 2, 0).float()
    model.set_attn_implementation(attn)
    padded, g_padded = _per_sample(model, packing=False)
    packed, g_packed = _per_sample(model, packing=True)
    assert torch.isfinite(padded).all() and padded[-1] == 0  # the 1-token sample has nothing to score
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert g_packed.keys() == g_padded.keys()
    for k in g_padded:
        torch.testing.assert_close(g_packed[k], g_padded[k], rtol=1e-4, atol=1e-6, msg=k)

    # Control: the same concatenated row scored as one sequence (positions running on, attention across samples).
    b = _batch()
    flat, positions, keep = pack_batch(b["input_ids"], b["attention_mask"])
    assert positions[0].tolist() == [*range(11), *range(3), *range(8), 0]
    with torch.no_grad():
        h = model.model(input_ids=flat, attention_mask=torch.ones_like(flat)).last_hidden_state
        crossed = torch.zeros(*keep.shape, h.shape[-1]).masked_scatter(keep[..., None], h[0])
        ll = sequence_log_probs(crossed, model.lm_head.weight, b["labels"])
    assert not torch.allclose(ll[1:3], padded[1:3], rtol=1e-3, atol=1e-3)


def test_attention_implementations(tmp_path: Path) -> None:
    path = tiny_model(tmp_path / "m", 0, layers=2)
    b = _batch()
    outs = {}
    for attn in ("sdpa", "eager"):
        model = load_model(str(path), attn_implementation=attn)
        assert model.config._attn_implementation == attn
        with torch.no_grad():
            h, w, _ = HiddenAndHead(model)(b["input_ids"], b["attention_mask"])
            outs[attn] = sequence_log_probs(h, w, b["labels"])
    torch.testing.assert_close(outs["eager"], outs["sdpa"], rtol=1e-5, atol=1e-5)
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        with pytest.raises(PipelineError, match="flash_attention_2 needs the flash-attn package"):
            load_model(str(path), attn_implementation="flash_attention_2")


def test_stages_refuse_flash_attention_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    from proxykd_fast.cli import main

    rc = main(["precompute", "--proxy", "/nonexistent/proxy", "--data", "x.jsonl", "--attn-implementation",
               "flash_attention_2", "--output-dir", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2 and "flash-attn" in err and "/nonexistent" not in err and not (tmp_path / "t").exists()
