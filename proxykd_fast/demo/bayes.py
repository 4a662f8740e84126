"""The demos' Bayesian (v1) stages: the corpus prior over the student's answers, then its top-k targets.

Shared by the default and the smollm2 presets, so both build the prior and fit the posterior alike.
Each stage resumes from disk (`prior` keeps its count shards, `precompute` its target shards and its
`posterior_fit.json`), so a re-run reuses what an earlier one finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxykd_fast.pipeline import PrecomputeConfig, precompute

# target source name -> precompute's --posterior (the prior alone, or the Dirichlet posterior through the proxy)
BAYES_TARGETS = {"prior": "prior", "posterior": "dirichlet"}


def bayes_targets(root: Path, train: Path, val: Path, proxy_dir: Path, order: int, precompute_options: dict[str, Any],
                  sources: tuple[str, ...] = tuple(BAYES_TARGETS), timings: dict[str, Any] | None = None,
                  progress: bool = False, log: Callable[[str], None] = print
                  ) -> tuple[Path, dict[str, Path], dict[str, Any] | None]:
    """Build the prior over `train` (read with the proxy's tokenizer, as distill reads it), then precompute
    top-k targets for each of `sources` ("prior", "posterior") in root/targets_<source>.

    The posterior's strength (kappa, alpha) is fitted on the held-out `val` answers, never counted in the
    prior. `precompute_options` are the preset's other precompute options (data, split, top_k, batch size,
    ...), the same as its proxy's targets get. Returns (the prior's dir, the targets' dirs, the posterior fit:
    kappa, alpha and the held-out NLL per token of prior, proxy and posterior; None without "posterior").
    """
    from proxykd_fast.prior import PriorConfig, build_prior

    unknown = [s for s in sources if s not in BAYES_TARGETS]
    if unknown or not sources:
        raise ValueError(f"sources must name some of {', '.join(BAYES_TARGETS)}; got {sources!r}")
    timings = {} if timings is None else timings
    max_length = precompute_options.get("max_length", PrecomputeConfig().max_length)  # leave-one-out needs equal cuts
    prior_dir = root / "prior"
    t = time.perf_counter()
    info = build_prior(PriorConfig(data=str(train), tokenizer=str(proxy_dir), output_dir=str(prior_dir), order=order,
                                   max_length=max_length, progress=progress, resume="auto"))
    timings["prior_s"] = time.perf_counter() - t
    log(f"prior: {info['num_events']} events, {info['num_contexts']} contexts, {info['num_pairs']} "
        f"(context, token) pairs in {timings['prior_s']:.1f}s")
    targets: dict[str, Path] = {}
    fit = None
    for name in sources:
        t = time.perf_counter()
        targets[name] = root / f"targets_{name}"
        res = precompute(PrecomputeConfig(proxy=str(proxy_dir), output_dir=str(targets[name]), prior=str(prior_dir),
                                          posterior=BAYES_TARGETS[name], posterior_fit_data=str(val),
                                          **{"resume": "auto", **precompute_options}))
        timings[f"precompute_{name}_s"] = time.perf_counter() - t
        timings[f"precompute_{name}_hook"] = res["posterior_timing"]
        if name == "posterior":
            fit = res["posterior"]
            log(f"posterior fit on {fit['fit_tokens']} held-out teacher tokens: kappa {fit['strength']:.3g}, "
                f"alpha {fit['mix']:.3g}; NLL prior {fit['nll_prior']:.4f}, proxy {fit['nll_proxy']:.4f}, "
                f"posterior {fit['nll_posterior']:.4f}")
    return prior_dir, targets, fit


def context_coverage(prior_dir: Path, data: Path, tokenizer: str) -> dict[str, float]:
    """Share of the answer positions of `data` whose context of 1, 2, ... previous tokens occurs in the prior.

    How sparse the prior is where it is used: a context never seen leaves the posterior its base measure
    (the proxy and shorter contexts) alone. `data` should be held out (its samples are not left out here).
    """
    from proxykd_fast.pipeline.data import load_records, tokenize_records
    from proxykd_fast.pipeline.modeling import load_tokenizer
    from proxykd_fast.prior import load_prior
    from proxykd_fast.prior.posterior import answer_positions

    prior = load_prior(prior_dir)
    examples = tokenize_records(load_records(data), load_tokenizer(tokenizer), int(prior.meta["max_length"]))
    chain = prior.chain(answer_positions(prior, examples, leave_one_out=False).contexts)
    n = max(len(chain), 1)
    return {f"{k} previous token{'s' if k > 1 else ''}": float((chain[:, k] >= 0).sum() / n)
            for k in range(1, prior.order)}
