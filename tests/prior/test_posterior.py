"""precompute --prior: posterior formulas against full-vocabulary computations, kappa limits, leave-one-out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from proxykd_fast.pipeline import PrecomputeConfig, precompute
from proxykd_fast.pipeline.data import load_records, tokenize_records
from proxykd_fast.pipeline.modeling import HiddenAndHead, load_model, load_tokenizer
from proxykd_fast.pipeline.targets import load_targets
from proxykd_fast.prior import Posterior, PriorConfig, build_prior, load_prior
from proxykd_fast.prior.posterior import answer_positions
from tests.support.pipeline_data import tiny_model, write_data


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("posterior")
    data = write_data(root / "train.jsonl", 30, 1)
    proxy = tiny_model(root / "proxy", 0, hidden=24)
    build_prior(PriorConfig(data=str(data), tokenizer=str(proxy), output_dir=str(root / "prior"), shard_size=7,
                            progress=False))
    return {"root": root, "data": data, "proxy": proxy, "prior": root / "prior", "val": write_data(root / "v.jsonl",
                                                                                                 6, 5)}


def _targets(world: dict[str, Path], out: Path, **kw: object) -> tuple[dict, list]:
    cfg = PrecomputeConfig(proxy=str(world["proxy"]), data=str(world["data"]), output_dir=str(out), top_k=5,
                           batch_size=4, shard_size=8, split="0:1", progress=False, prior=str(kw.pop("prior",
                                                                                                  world["prior"])),
                           **kw)
    precompute(cfg)
    manifest, rows, _ = load_targets(out)
    return manifest, rows


def _full_terms(world: dict[str, Path], prior_dir: Path | None = None) -> list[dict[str, np.ndarray]]:
    """Per sample: the proxy's fp64 log-softmax over V and the prior's terms over every token (leave-one-out)."""
    tok = load_tokenizer(str(world["proxy"]))
    model = load_model(str(world["proxy"])).eval()
    pr = load_prior(prior_dir or world["prior"])
    post = Posterior(pr, "dirichlet", 1.0, 0.5, len(tok))
    out = []
    for e in tokenize_records(load_records(world["data"]), tok, 1024):
        with torch.no_grad():
            h, w, _ = HiddenAndHead(model)(torch.tensor([e.prompt + e.answer]), torch.ones(1, len(e.prompt + e.answer),
                                                                                          dtype=torch.long))
        logits = (h[0].double() @ w.double().T).detach()[len(e.prompt) - 1: len(e.prompt) - 1 + len(e.answer)]
        pos = answer_positions(pr, [e])
        gids = pr.chain(pos.contexts)
        cols = np.tile(np.arange(len(tok)), (len(pos.seq), 1))
        terms = post.prior_terms(pos, gids, cols)
        out.append({"lp": torch.log_softmax(logits, -1).numpy(), **terms})
    return out


def test_dirichlet_targets_are_the_posterior_mean_over_the_full_vocab(world: dict[str, Path], tmp_path: Path) -> None:
    kappa, alpha = 3.0, 0.4
    manifest, rows = _targets(world, tmp_path / "d", prior_strength=kappa, prior_mix=alpha)
    assert manifest["posterior"]["strength"] == kappa and manifest["posterior"]["mix"] == alpha
    assert manifest["posterior"]["fit_samples_in_prior"] > 0
    for r, t in zip(rows, _full_terms(world)):
        q = (t["c_top"] + kappa * (alpha * np.exp(t["lp"]) + (1 - alpha) * t["lower"])) / (t["n_top"][:, None] + kappa)
        np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-6)
        stored = np.take_along_axis(np.log(q), r.topk_ids, 1)
        np.testing.assert_allclose(r.topk_logprobs, stored, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(r.topk_ids[:, 0], q.argmax(1))  # the best token is always a candidate
        assert (np.diff(r.topk_logprobs, axis=1) <= 1e-6).all()


def test_product_targets_are_normalised_over_the_full_vocab(world: dict[str, Path], tmp_path: Path) -> None:
    lam = 0.6
    _, rows = _targets(world, tmp_path / "p", posterior="product", prior_strength=lam)
    for r, t in zip(rows, _full_terms(world)):
        s = lam * np.log(t["full"]) + (1 - lam) * t["lp"]
        logq = s - np.logaddexp.reduce(s, axis=1, keepdims=True)
        np.testing.assert_allclose(r.topk_logprobs, np.take_along_axis(logq, r.topk_ids, 1), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(r.topk_ids[:, 0], logq.argmax(1))


def test_prior_only_targets(world: dict[str, Path], tmp_path: Path) -> None:
    _, rows = _targets(world, tmp_path / "o", posterior="prior")
    for r, t in zip(rows, _full_terms(world)):
        np.testing.assert_allclose(r.topk_logprobs, np.log(np.take_along_axis(t["full"], r.topk_ids, 1)), rtol=1e-6)


def test_kappa_limits_give_the_counts_and_the_base(world: dict[str, Path]) -> None:
    tok = load_tokenizer(str(world["proxy"]))
    pr = load_prior(world["prior"])
    from proxykd_fast.pipeline.data import Example

    e = tokenize_records(load_records(world["data"])[:3], tok, 1024) + [Example(99, [10] * 4, [11, 11, 12])]
    pos = answer_positions(pr, e)
    gids = pr.chain(pos.contexts)
    cols = np.tile(np.arange(len(tok)), (len(pos.seq), 1))
    rng = np.random.default_rng(0)
    lp = torch.log_softmax(torch.from_numpy(rng.normal(size=cols.shape) * 2), -1).numpy()
    post = Posterior(pr, "dirichlet", None, None, len(tok))
    terms = post.prior_terms(pos, gids, cols)
    seen = terms["n_top"] > 0
    assert seen.any() and (~seen).any()
    q0 = np.exp(post.log_q(terms, lp, cols, 1e-9, 0.3, None))
    np.testing.assert_allclose(q0[seen], terms["c_top"][seen] / terms["n_top"][seen, None], atol=1e-8)
    base = 0.3 * np.exp(lp) + 0.7 * terms["lower"]
    np.testing.assert_allclose(q0[~seen], base[~seen], rtol=1e-9)  # no counts: the base measure
    qinf = np.exp(post.log_q(terms, lp, cols, 1e12, 1.0, None))
    np.testing.assert_allclose(qinf, np.exp(lp), rtol=1e-6, atol=1e-12)  # kappa -> inf, alpha = 1: the proxy
    for kappa in (0.5, 7.0):
        q = np.exp(post.log_q(terms, lp, cols, kappa, 0.3, None))
        np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(q, (terms["c_top"] + kappa * base) / (terms["n_top"][:, None] + kappa), rtol=1e-12)
    prod = Posterior(pr, "product", None, None, len(tok))
    np.testing.assert_allclose(prod.log_q(terms, lp, cols, 1.0, None, None), np.log(terms["full"]), rtol=1e-12)
    np.testing.assert_allclose(prod.log_q(terms, lp, cols, 0.0, None, None), lp, rtol=1e-12)


def test_targets_unchanged_when_the_sample_is_removed_from_the_corpus(world: dict[str, Path], tmp_path: Path) -> None:
    records = load_records(world["data"])
    i = 5
    (tmp_path / "rest.jsonl").write_text("".join(json.dumps(r) + "\n" for j, r in enumerate(records) if j != i))
    build_prior(PriorConfig(data=str(tmp_path / "rest.jsonl"), tokenizer=str(world["proxy"]),
                            output_dir=str(tmp_path / "prior_rest"), progress=False))
    for kw in ({"prior_strength": 2.0, "prior_mix": 0.5}, {"posterior": "product", "prior_strength": 0.5},
               {"posterior": "prior"}):
        _, full = _targets(world, tmp_path / "a", **kw)
        _, rest = _targets(world, tmp_path / "b", prior=tmp_path / "prior_rest", **kw)
        np.testing.assert_array_equal(full[i].topk_ids, rest[i].topk_ids)
        np.testing.assert_allclose(full[i].topk_logprobs, rest[i].topk_logprobs, rtol=1e-6, atol=1e-6)
        assert not all(np.array_equal(a.topk_ids, b.topk_ids) for a, b in zip(full, rest))  # others differ


def test_fitted_strength_is_reported_and_reused(world: dict[str, Path], tmp_path: Path) -> None:
    manifest, _ = _targets(world, tmp_path / "f", posterior_fit_data=str(world["val"]))
    fit = manifest["posterior"]
    assert fit["fitted"] and fit["fit_samples"] == 6 and fit["fit_samples_in_prior"] == 0
    assert 0 < fit["strength"] and 0 <= fit["mix"] <= 1
    assert fit["nll_posterior"] <= min(fit["nll_prior"], fit["nll_proxy"]) + 1e-9  # the grid contains both ends
    assert json.loads((tmp_path / "f" / "posterior_fit.json").read_text())["strength"] == fit["strength"]
    manifest, _ = _targets(world, tmp_path / "g", posterior="product")
    assert 0 <= manifest["posterior"]["strength"] <= 1 and manifest["posterior"]["fit_samples_in_prior"] > 0
