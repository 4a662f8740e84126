"""A tiny random Llama teacher with a character-level tokenizer, built offline in milliseconds.

Used by tests, benchmarks and demos where any real model would be too slow or need a download.
"""

from __future__ import annotations

import string
from typing import Any

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer() -> Any:
    """A character-level PreTrainedTokenizerFast over printable ASCII, with a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    # BPE with no merges splits text into single characters; Fuse joins them back on decode.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(vocab_size: int, seed: int = 0, hidden_size: int = 32, num_layers: int = 1) -> Any:
    """A randomly initialised LlamaForCausalLM small enough to run anywhere.

    Special-token rows of the output layer are zeroed and the others scaled up, so answers are
    peaked (well separated greedy choices) and rarely end at once with an empty completion.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            head = model.lm_head.weight
            head.normal_(0.0, 3.0 / hidden_size**0.5)
            head[: len(SPECIAL_TOKENS)] = 0.0
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.eval()


def tiny_teacher(seed: int = 0) -> tuple[Any, Any]:
    """Return (model, tokenizer) for the tiny random teacher."""
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(len(tokenizer), seed=seed), tokenizer
