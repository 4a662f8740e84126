"""Tiny data files and models for pipeline tests (a small Markov world, word-level tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

from proxykd_fast.demo.world import MarkovWorld, build_llama, build_tokenizer, save, words_to_text

N_WORDS = 40


def write_data(path: Path, n: int, seed: int) -> Path:
    """Prompt/completion records from a small Markov world."""
    seqs = MarkovWorld.make(N_WORDS, 4, 0.5, 0).sample(n, 10, seed)
    path.write_text("".join(json.dumps({"prompt": words_to_text(s[:4]), "completion": words_to_text(s[4:]),
                                        "finish_reason": "length"}) + "\n" for s in seqs))
    return path


def tiny_model(path: Path, seed: int, hidden: int = 16, n_words: int = N_WORDS, layers: int = 1) -> Path:
    """A small Llama (1 layer by default) with the word-level tokenizer, saved for from_pretrained."""
    tok = build_tokenizer(n_words)
    save(build_llama(len(tok), hidden, layers, 32, 2, seed), tok, path)
    return path
