"""How close each target source is to the teacher: exact KL(teacher || targets) per held-out answer token.

Only the demo can compute this: the evaluator owns the teacher and the vocabulary is small, so every
distribution is taken over the full vocabulary (the proxies' softmax, the corpus prior's smoothed
estimate and the Dirichlet posterior built from both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from proxykd_fast.pipeline.data import Example, iter_chunks, sft_batch
from proxykd_fast.pipeline.modeling import load_model


def _answer_logprobs(model: Any, chunk: list[Example], pad_id: int) -> np.ndarray:
    """fp64 log-softmax over the vocabulary at every answer position of the chunk, [P, V] in order."""
    b = sft_batch(chunk, pad_id)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    rows = [logits[i, len(e.prompt) - 1: len(e.prompt) - 1 + len(e.answer)] for i, e in enumerate(chunk)]
    return torch.log_softmax(torch.cat(rows), -1).numpy()


@torch.no_grad()
def target_kls(teacher_dir: str | Path, proxies: dict[str, str | Path], prior_dir: str | Path | None,
               fit: dict[str, Any] | None, posterior_proxy: str | None, examples: list[Example], pad_id: int,
               batch_size: int = 250) -> dict[str, float]:
    """Mean KL(teacher || source) over the answer tokens of `examples` for each proxy, the prior and the posterior.

    The posterior is the Dirichlet one, q = (c + kappa (alpha p + (1 - alpha) lower)) / (n + kappa), with the
    proxy `posterior_proxy` and the fitted kappa / alpha in `fit`.
    """
    from proxykd_fast.prior import Posterior, load_prior
    from proxykd_fast.prior.posterior import answer_positions

    teacher = load_model(str(teacher_dir)).eval()
    models = {name: load_model(str(path)).eval() for name, path in proxies.items()}
    prior = load_prior(prior_dir) if prior_dir else None
    totals: dict[str, float] = {}
    count = 0
    for chunk in iter_chunks(examples, batch_size):
        lt = _answer_logprobs(teacher, chunk, pad_id)
        pt = np.exp(lt)
        sources = {name: _answer_logprobs(m, chunk, pad_id) for name, m in models.items()}
        if prior is not None:
            post = Posterior(prior, "dirichlet", None, None, lt.shape[1])
            pos = answer_positions(prior, chunk)
            cols = np.tile(np.arange(lt.shape[1]), (len(pos.seq), 1))
            terms = post.prior_terms(pos, prior.chain(pos.contexts), cols)
            with np.errstate(divide="ignore"):
                sources["prior"] = np.log(terms["full"])
            if fit is not None and posterior_proxy is not None:
                sources["posterior"] = post.log_q(terms, sources[posterior_proxy], cols, fit["strength"], fit["mix"],
                                                  None)
        for name, lq in sources.items():
            kl = np.where(pt > 0, pt * (lt - lq), 0.0).sum(1)
            totals[name] = totals.get(name, 0.0) + float(kl.sum())
        count += lt.shape[0]
    return {name: v / max(count, 1) for name, v in totals.items()}
