"""`precompute --prior`: posterior top-k targets in the stage's own format, with the strength fitted or given.

The fit maximises the likelihood of held-out teacher tokens: those of `--posterior-fit-data`, or of the
first `--posterior-fit-samples` student samples, each scored under the prior *without* its own counts
(leave-one-out, the limit of cross-fitting with one sample per fold). It is written to
`posterior_fit.json` once, so a resumed run uses the very same values.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .build import load_prior
from .posterior import Posterior, answer_positions, topk_columns

FIT_FILE = "posterior_fit.json"
KAPPA_GRID = np.logspace(-2, 4, 61)
MIX_GRID = np.linspace(0.0, 1.0, 41)
LAMBDA_GRID = np.linspace(0.0, 1.0, 41)


def check_posterior_options(prior: str | None, posterior: str, strength: float | None, mix: float | None,
                            fit_data: str | None = None) -> None:
    """Refuse option combinations that mean nothing (ValueError naming the option)."""
    from .posterior import POSTERIORS

    if not prior:
        given = [n for n, v in (("prior_strength", strength), ("prior_mix", mix), ("posterior_fit_data", fit_data))
                 if v is not None] + (["posterior"] if posterior != "dirichlet" else [])
        if given:
            raise ValueError(f"option(s) {', '.join(given)} need --prior (a `proxykd prior` output dir)")
        return
    if posterior not in POSTERIORS:
        raise ValueError(f"option 'posterior' must be one of {', '.join(POSTERIORS)}; got {posterior!r}")
    if posterior == "prior" and strength is not None:
        raise ValueError("option 'prior_strength' has no meaning with posterior='prior' (the prior alone)")
    if posterior != "dirichlet" and mix is not None:
        raise ValueError(f"option 'prior_mix' (alpha of the hierarchical base) needs posterior='dirichlet', "
                         f"got posterior={posterior!r}")
    if posterior == "dirichlet" and strength is not None and strength <= 0:
        raise ValueError(f"option 'prior_strength' (kappa) must be > 0, got {strength!r}")
    if posterior == "product" and strength is not None and not 0 <= strength <= 1:
        raise ValueError(f"option 'prior_strength' (lambda) must be in [0, 1], got {strength!r}")
    if mix is not None and not 0 <= mix <= 1:
        raise ValueError(f"option 'prior_mix' (alpha) must be in [0, 1], got {mix!r}")


def _proxy_passes(model: torch.nn.Module, examples: list[Any], pad_id: int, cfg: Any) -> Iterator[tuple]:
    """(chunk, hidden, weight, bias, top ids, top log-probs) of the proxy, one batch at a time."""
    from proxykd_fast.losses import linear_topk
    from proxykd_fast.pipeline.data import iter_chunks, sft_batch
    from proxykd_fast.pipeline.modeling import HiddenAndHead

    wrapped = HiddenAndHead(model)
    device = next(model.parameters()).device
    for chunk in iter_chunks(examples, cfg.per_device_eval_batch_size):
        b = {k: v.to(device) for k, v in sft_batch(chunk, pad_id).items()}
        hidden, w, bias = wrapped(b["input_ids"], b["attention_mask"])
        ids, lps = linear_topk(hidden, w, cfg.top_k, bias=bias, chunk_size=cfg.chunk_size, backend=cfg.backend)
        yield chunk, hidden, w, bias, ids, lps


class PosteriorTargets:
    """Loads the prior, checks it against the tokenizer, fits the strength, then rewrites each batch's top-k."""

    def __init__(self, cfg: Any, tokenizer: Any, model: torch.nn.Module, out: Path, fit_examples: list[Any]
                 ) -> None:
        from proxykd_fast.pipeline.modeling import PipelineError, vocab_size
        from proxykd_fast.pipeline.targets import vocab_fingerprint

        check_posterior_options(cfg.prior, cfg.posterior, cfg.prior_strength, cfg.prior_mix, cfg.posterior_fit_data)
        self.cfg = cfg
        self.prior = load_prior(cfg.prior)
        meta = self.prior.meta
        if meta["vocab_fingerprint"] != vocab_fingerprint(tokenizer) or meta["vocab_size"] != len(tokenizer):
            raise PipelineError(
                f"the prior in {cfg.prior} was counted with another vocabulary ({meta['vocab_size']} tokens, "
                f"fingerprint {meta['vocab_fingerprint']}) than the proxy's tokenizer ({len(tokenizer)} tokens, "
                f"{vocab_fingerprint(tokenizer)}): rebuild it with `proxykd prior --tokenizer` set to the proxy")
        if meta["max_length"] != cfg.max_length:
            raise PipelineError(
                f"the prior was built with max_length={meta['max_length']} but precompute runs with "
                f"max_length={cfg.max_length}: samples would be cut differently and leave-one-out could not find "
                "them; use the same --max-length")
        self.model = model
        self.pad_id = tokenizer.pad_token_id
        self.lookup_s = self.fit_s = self.total_s = 0.0
        self.positions = 0
        self.post = Posterior(self.prior, cfg.posterior, cfg.prior_strength, cfg.prior_mix, vocab_size(model))
        path = out / FIT_FILE
        if cfg.resume and path.exists():
            self.fit = json.loads(path.read_text(encoding="utf-8"))
        else:
            text = json.dumps(self._fit(fit_examples), indent=2, sort_keys=True)
            self.fit = json.loads(text)  # the same key order as a resumed run that reads the file
            tmp = path.with_name("." + path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        self.post.strength = self.fit.get("strength")
        self.post.mix = self.fit.get("mix")

    # ---- fitting ---------------------------------------------------------------------------------------
    def _fit(self, examples: list[Any]) -> dict[str, Any]:
        """Fit kappa (and alpha) or lambda on held-out teacher tokens; report their NLL under each estimate."""
        post, cfg = self.post, self.cfg
        need_fit = cfg.posterior != "prior" and (cfg.prior_strength is None or
                                                 (cfg.posterior == "dirichlet" and cfg.prior_mix is None))
        stats: dict[str, list[np.ndarray]] = {k: [] for k in ("c", "n", "p", "low", "full")}
        lam_ll = np.zeros(LAMBDA_GRID.size)
        members = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for chunk, hidden, w, bias, ids, lps in _proxy_passes(self.model, examples, self.pad_id, cfg):
                pos = answer_positions(self.prior, chunk)
                if not len(pos.seq):
                    continue
                members += pos.members
                h, top_ids, top_lps = self._at_positions(pos, hidden, ids, lps)
                gids = self.prior.chain(pos.contexts)
                cols, _ = post.columns(pos, gids, top_ids.cpu().numpy(), with_target=True)
                terms = post.prior_terms(pos, gids, cols)
                lp, lse = post.proxy_terms(h, w, bias, cols, top_ids, top_lps)
                j = np.argmax(cols == pos.targets[:, None], axis=1)[:, None]

                def at(a: np.ndarray, j: np.ndarray = j) -> np.ndarray:
                    return np.take_along_axis(a, j, 1)[:, 0]

                stats["c"].append(at(terms["c_top"]))
                stats["n"].append(terms["n_top"])
                stats["p"].append(at(np.exp(lp)))
                stats["low"].append(at(terms["lower"]))
                stats["full"].append(at(terms["full"]))
                if cfg.posterior == "product" and cfg.prior_strength is None:
                    for i, lam in enumerate(LAMBDA_GRID):
                        rem = None if lam in (0.0, 1.0) else post.remainder(h, w, bias, float(lam), lse,
                                                                            cfg.chunk_size, cfg.backend)
                        lam_ll[i] += at(post.log_q(terms, lp, cols, float(lam), None, rem)).sum()
        if not stats["c"]:
            raise ValueError("the posterior fit found no answer tokens in its data (posterior_fit_data / the "
                             "first posterior_fit_samples samples)")
        s = {k: np.concatenate(v) for k, v in stats.items()}
        m = s["c"].size
        out: dict[str, Any] = {"posterior": cfg.posterior, "fit_tokens": int(m), "fit_samples": len(examples),
                               "fit_samples_in_prior": int(members), "fitted": need_fit,
                               "nll_prior": float(-np.log(s["full"]).mean()),
                               "nll_proxy": float(-np.log(s["p"]).mean())}
        if cfg.posterior == "dirichlet":
            kappas = KAPPA_GRID if cfg.prior_strength is None else np.asarray([cfg.prior_strength])
            mixes = MIX_GRID if cfg.prior_mix is None else np.asarray([cfg.prior_mix])
            kappa, mix, ll = _grid_dirichlet(s, kappas, mixes)
            if cfg.prior_strength is None:  # refine kappa between its grid neighbours
                i = int(np.searchsorted(KAPPA_GRID, kappa))
                fine = np.logspace(np.log10(KAPPA_GRID[max(i - 1, 0)]),
                                   np.log10(KAPPA_GRID[min(i + 1, KAPPA_GRID.size - 1)]), 21)
                kappa, mix, ll = _grid_dirichlet(s, fine, np.asarray([mix]) if cfg.prior_mix is None else mixes)
            out.update(strength=float(kappa), mix=float(mix), nll_posterior=float(-ll / m))
        elif cfg.posterior == "product":
            if cfg.prior_strength is None:
                i = int(np.argmax(lam_ll))
                out.update(strength=float(LAMBDA_GRID[i]), nll_posterior=float(-lam_ll[i] / m),
                           nll_by_strength={f"{x:.3f}": float(-v / m) for x, v in zip(LAMBDA_GRID, lam_ll)})
            else:
                out.update(strength=float(cfg.prior_strength))
        self.fit_s = time.perf_counter() - t0
        return out

    @staticmethod
    def _at_positions(pos: Any, hidden: Tensor, ids: Tensor, lps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Hidden states and proxy top-k at the answer positions, [P, ...]."""
        seq = torch.from_numpy(pos.seq).to(hidden.device)
        slot = torch.from_numpy(pos.slot).to(hidden.device)
        return hidden[seq, slot], ids[seq, slot], lps[seq, slot]

    # ---- the targets -----------------------------------------------------------------------------------
    def __call__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk: list[Any], ids: Tensor,
                 lps: Tensor) -> tuple[Tensor, Tensor]:
        """Replace the proxy's top-k at every answer position of `chunk` by the posterior's."""
        post, cfg = self.post, self.cfg
        t0 = time.perf_counter()
        pos = answer_positions(self.prior, chunk)
        if not len(pos.seq):
            return ids, lps
        h, top_ids, top_lps = self._at_positions(pos, hidden, ids, lps)
        gids = self.prior.chain(pos.contexts)
        cols, sel = post.columns(pos, gids, top_ids.cpu().numpy(), with_target=False)
        terms = post.prior_terms(pos, gids, cols)
        self.lookup_s += time.perf_counter() - t0
        lp, lse = post.proxy_terms(h, weight, bias, cols, top_ids, top_lps)
        rem = None
        if cfg.posterior == "product" and 0.0 < post.strength < 1.0:
            rem = post.remainder(h, weight, bias, post.strength, lse, cfg.chunk_size, cfg.backend)
        t1 = time.perf_counter()
        logq = post.log_q(terms, lp, cols, post.strength, post.mix, rem)
        new_ids, new_lq = topk_columns(logq, cols, sel, ids.shape[-1])
        self.lookup_s += time.perf_counter() - t1
        self.positions += len(pos.seq)
        ids, lps = ids.clone(), lps.clone()
        seq = torch.from_numpy(pos.seq).to(ids.device)
        slot = torch.from_numpy(pos.slot).to(ids.device)
        ids[seq, slot] = torch.from_numpy(new_ids).to(ids.device, ids.dtype)
        lps[seq, slot] = torch.from_numpy(new_lq).to(lps.device, lps.dtype)
        self.total_s += time.perf_counter() - t0
        return ids, lps

    def summary(self) -> dict[str, Any]:
        """What the manifest records: the setting and the fit (no timings, so a resumed run writes the same file)."""
        return {"prior": self.cfg.prior, **self.fit}

    def timing(self) -> dict[str, Any]:
        """Seconds of this invocation: the fit, the posterior's CPU-side work (prior lookup, candidates, top-k)
        and the whole hook (that plus the proxy gathers), over `positions` answer tokens."""
        return {"fit_s": self.fit_s, "prior_lookup_s": self.lookup_s, "hook_s": self.total_s,
                "positions": self.positions}


def _grid_dirichlet(s: dict[str, np.ndarray], kappas: np.ndarray, mixes: np.ndarray) -> tuple[float, float, float]:
    """The (kappa, alpha) of the grid with the highest summed log q(y), and that sum."""
    best = (-np.inf, 0.0, 0.0)
    for mix in mixes:
        base = mix * s["p"] + (1 - mix) * s["low"]
        ll = (np.log(s["c"][None] + kappas[:, None] * base[None]) - np.log(s["n"][None] + kappas[:, None])).sum(1)
        i = int(np.argmax(ll))
        if ll[i] > best[0]:
            best = (float(ll[i]), float(kappas[i]), float(mix))
    return best[1], best[2], best[0]


def fit_examples(cfg: Any, tokenizer: Any, lo: int, hi: int) -> list[Any]:
    """The examples the strength is fitted on: --posterior-fit-data, else the first samples of the split."""
    from proxykd_fast.pipeline.data import iter_records, tokenize_records

    if cfg.posterior_fit_data:
        records = list(islice(iter_records(cfg.posterior_fit_data), cfg.posterior_fit_samples))
    else:
        records = list(islice(iter_records(cfg.data), lo, min(hi, lo + cfg.posterior_fit_samples)))
    return tokenize_records(records, tokenizer, cfg.max_length)
