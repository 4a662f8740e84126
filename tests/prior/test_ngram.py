"""The n-gram index: exact counts, smoothing against a brute-force recursion, leave-one-out, bad input."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from proxykd_fast.prior.ngram import NGramPrior, event_windows, sequence_hash, sum_rows
from proxykd_fast.prior.posterior import answer_positions
from tests.support.ngram_reference import counts, prob

V = 6


def corpus(seed: int = 0, n: int = 14) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = [([int(x) for x in rng.integers(0, V, rng.integers(1, 4))],
            [int(x) for x in rng.integers(0, V, rng.integers(0, 6))]) for _ in range(n)]
    out.append(out[3])  # a duplicate sample: leave-one-out removes one copy only
    return out


def build(data: list[tuple[list[int], list[int]]], order: int = 3, smoothing: str = "witten_bell",
          include_prompts: bool = False) -> NGramPrior:
    wins = [event_windows(p, a, order, V, include_prompts) for p, a in data]
    rows, c = sum_rows(np.concatenate(wins), np.ones(sum(len(w) for w in wins), dtype=np.int64))
    hashes = np.asarray([sequence_hash(p, a) for p, a in data], dtype=np.int64)
    meta = {"order": order, "vocab_size": V, "smoothing": smoothing, "dirichlet_beta": 0.7,
            "root_pseudocount": 1.3, "include_prompts": include_prompts}
    return NGramPrior.from_counts(rows, c, hashes, meta)


def all_contexts(order: int) -> np.ndarray:
    """Every context of order-1 tokens over V plus the start sentinel (id V)."""
    grids = np.meshgrid(*[np.arange(V + 1)] * (order - 1), indexing="ij")
    return np.stack([g.reshape(-1) for g in grids], axis=1) if order > 1 else np.zeros((1, 0), dtype=np.int64)


def test_counts_exact_on_a_hand_made_corpus() -> None:
    # prompt [0, 1], answer [2, 2, 1]; prompt [1], answer [2, 2]: trigram events of the answers only
    data = [([0, 1], [2, 2, 1]), ([1], [2, 2])]
    pr = build(data)
    g = pr.chain(np.asarray([[0, 1], [1, 2], [2, 2], [V, 1], [3, 4]]))
    assert g[:, 0].tolist() == [0] * 5 and (g[4, 1:] == -1).all()
    n, t = pr.level_stats(g, None, None)
    # events: (0,1)->2, (1,2)->2, (2,2)->1 from the first answer; (start,1)->2, (1,2)->2 from the second
    assert n[:, 0].tolist() == [5] * 5 and t[:, 0].tolist() == [2] * 5
    assert n[0].tolist() == [5, 2, 1] and t[0].tolist() == [2, 1, 1]  # "1" -> 2, 2; (0, 1) -> 2
    assert n[1].tolist() == [5, 3, 2] and t[1].tolist() == [2, 2, 1]  # "2" -> 2, 1, 2; (1, 2) -> 2, 2
    assert n[2].tolist() == [5, 3, 1] and t[2].tolist() == [2, 2, 1]  # (2, 2) -> 1
    assert n[3].tolist() == [5, 2, 1]  # (start, 1) -> 2
    c = pr.pair_counts(g, np.asarray([[2, 1]] * 5), None, None)
    assert c[0].tolist() == [[4, 1], [2, 0], [1, 0]]
    assert c[2].tolist() == [[4, 1], [2, 1], [0, 1]]
    assert (c[4, 1:] == 0).all()
    ref = counts(data, 3, V)
    assert sum(v for (h, _), v in ref.items() if h == ()) == int(pr.ctx_total[0])
    assert pr.n_contexts == 1 + len({h for (h, _) in ref if len(h) == 1}) + len({h for (h, _) in ref if len(h) == 2})


@pytest.mark.parametrize("smoothing", ["witten_bell", "dirichlet"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("include_prompts", [False, True])
def test_smoothing_matches_brute_force_on_every_context(smoothing: str, order: int, include_prompts: bool) -> None:
    data = corpus(1)
    pr = build(data, order, smoothing, include_prompts)
    ctx = all_contexts(order)
    toks = np.tile(np.arange(V), (len(ctx), 1))
    p, gamma = pr.probs(pr.chain(ctx), toks)
    c = counts(data, order, V, include_prompts)
    ref = np.asarray([[prob(c, tuple(int(x) for x in h), w, V, smoothing, 0.7, 1.3) for w in range(V)] for h in ctx])
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=0)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)
    # Gamma: the mass passed to the root for a token unseen at every non-empty level
    root = np.asarray([c[((), w)] + 1.3 / V for w in range(V)])
    unseen_everywhere = [(i, w) for i, h in enumerate(ctx) for w in range(V)
                         if all(c[(tuple(int(x) for x in h[len(h) - k:]), w)] == 0 for k in range(1, order))]
    for i, w in unseen_everywhere:
        assert p[i, w] == pytest.approx(gamma[i] * root[w], rel=1e-12)


@pytest.mark.parametrize("smoothing", ["witten_bell", "dirichlet"])
@pytest.mark.parametrize("include_prompts", [False, True])
def test_leave_one_out_equals_rebuilding_without_the_sample(smoothing: str, include_prompts: bool) -> None:
    data = corpus(2)
    pr = build(data, 3, smoothing, include_prompts)
    for i in [0, 3, 5, len(data) - 1]:
        ex = [SimpleNamespace(prompt=data[i][0], answer=data[i][1])]
        if not ex[0].answer:
            continue
        pos = answer_positions(pr, ex)
        assert pos.members == 1
        toks = np.tile(np.arange(V), (len(pos.seq), 1))
        got, g1 = pr.probs(pr.chain(pos.contexts), toks, pos.seq, pos.own)
        rest = data[:i] + data[i + 1:]
        again = build(rest, 3, smoothing, include_prompts)
        pos2 = answer_positions(again, ex)
        assert pos2.members == (1 if data[i] in rest else 0)  # a duplicate keeps its other copy in the corpus
        want, g2 = again.probs(again.chain(pos2.contexts), toks)  # the rebuilt prior, nothing removed
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
        np.testing.assert_allclose(g1, g2, rtol=1e-12)


def test_leave_one_out_off_for_samples_not_in_the_corpus() -> None:
    data = corpus(3)
    pr = build(data)
    ex = [SimpleNamespace(prompt=[0], answer=[5, 5, 5, 5, 5, 5, 5])]
    pos = answer_positions(pr, ex)
    assert pos.members == 0 and pos.own is None


def test_counting_is_independent_of_order_and_sharding() -> None:
    data = corpus(4)
    a = build(data)
    wins = [event_windows(p, q, 3, V, False) for p, q in data[::-1]]
    halves = [sum_rows(np.concatenate(w), np.ones(sum(len(x) for x in w), np.int64)) for w in (wins[:5], wins[5:])]
    rows, c = sum_rows(np.concatenate([h[0] for h in halves]), np.concatenate([h[1] for h in halves]))
    b = NGramPrior.from_counts(rows, c, np.asarray([sequence_hash(p, q) for p, q in data]), a.meta)
    for k, v in a.arrays().items():
        np.testing.assert_array_equal(v, b.arrays()[k], err_msg=k)


def test_reference_counter_sanity() -> None:
    assert counts([([1], [2])], 2, V) == Counter({((), 2): 1, ((1,), 2): 1})
