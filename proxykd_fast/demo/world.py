"""The demo's synthetic world: an order-2 Markov chain, a word-level tokenizer and tiny Llama models."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
OFFSET = len(SPECIALS)


def build_tokenizer(n_words: int) -> Any:
    """A word-level tokenizer over "t0".."t{n-1}" plus <pad>/<bos>/<eos>/<unk>, no network needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({f"t{i}": OFFSET + i for i in range(n_words)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def build_llama(vocab: int, hidden: int, layers: int, intermediate: int, heads: int, seed: int) -> Any:
    """A small randomly initialised LlamaForCausalLM (untied head) built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


@dataclass
class MarkovWorld:
    """Order-2 chain: the previous token picks `fanout` candidates, (previous, earlier mod `modes`) their weights."""

    support: np.ndarray  # [V, fanout] next-token candidates per previous token
    probs: np.ndarray  # [V, modes, fanout] Dirichlet weights per (previous token, earlier token mod modes)
    n_words: int

    @classmethod
    def make(cls, n_words: int, fanout: int, conc: float, seed: int, modes: int = 4) -> MarkovWorld:
        """A random world, fully determined by `seed`."""
        rng = np.random.default_rng(seed)
        support = np.stack([rng.choice(n_words, fanout, replace=False) for _ in range(n_words)])
        probs = rng.dirichlet(np.full(fanout, conc), size=(n_words, modes))
        return cls(support, probs, n_words)

    def related(self, keep: float, conc: float, seed: int) -> MarkovWorld:
        """A world sharing the candidates of a fraction `keep` of previous tokens; all weights redrawn."""
        rng = np.random.default_rng(seed)
        support = self.support.copy()
        fanout = support.shape[1]
        for v in np.nonzero(rng.random(self.n_words) >= keep)[0]:
            support[v] = rng.choice(self.n_words, fanout, replace=False)
        probs = rng.dirichlet(np.full(fanout, conc), size=self.probs.shape[:2])
        return MarkovWorld(support, probs, self.n_words)

    def sample(self, n: int, length: int, seed: int) -> np.ndarray:
        """n sequences of `length` word ids (not token ids), vectorised over sequences."""
        rng = np.random.default_rng(seed)
        modes = self.probs.shape[1]
        seqs = np.zeros((n, length), dtype=np.int64)
        seqs[:, :2] = rng.integers(0, self.n_words, (n, 2))
        for t in range(2, length):
            prev, mode = seqs[:, t - 1], seqs[:, t - 2] % modes
            cum = np.cumsum(self.probs[prev, mode], axis=1)
            u = rng.random((n, 1)) * cum[:, -1:]
            choice = (u > cum).sum(axis=1).clip(max=self.support.shape[1] - 1)
            seqs[:, t] = self.support[prev, choice]
        return seqs

    def entropy(self) -> float:
        """Mean next-token entropy (nats) over contexts, uniform weighting."""
        p = self.probs
        return float(-(p * np.log(np.clip(p, 1e-12, None))).sum(-1).mean())


def words_to_text(words: np.ndarray) -> str:
    """'t5 t17 ...' text for a row of word ids."""
    return " ".join(f"t{int(w)}" for w in words)


def pretrain(model: Any, seqs: np.ndarray, steps: int, batch: int, lr: float, seed: int, desc: str,
             skip_contexts: np.ndarray | None = None) -> list[float]:
    """Plain next-token training on word sequences (token id = word + OFFSET), cosine schedule.

    `skip_contexts` (word ids): positions whose previous word is one of them get no loss, so the model
    never learns what follows those contexts (the uneven-alignment variant of the demo's proxy).
    """
    from tqdm.auto import tqdm

    from proxykd_fast.losses import linear_cross_entropy
    from proxykd_fast.pipeline.modeling import HiddenAndHead

    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(seqs + OFFSET)
    wrapped = HiddenAndHead(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        ids = data[idx]
        labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
        if skip_contexts is not None and len(skip_contexts):
            labels[torch.isin(ids, torch.from_numpy(skip_contexts + OFFSET))] = -100
        hidden, w, b = wrapped(ids, torch.ones_like(ids))
        loss = linear_cross_entropy(hidden, w, labels, bias=b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def scale_head(model: Any, factor: float) -> None:
    """Multiply the lm_head so the model's softmax is softmax(factor * logits) (a sharper teacher)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)


def save(model: Any, tokenizer: Any, path: Path) -> None:
    """Save model + tokenizer for from_pretrained."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
