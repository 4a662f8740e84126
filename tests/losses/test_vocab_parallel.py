"""Vocab-parallel losses on 2 and 3 gloo ranks with uneven shards equal the single-process result.

Each rank holds a contiguous, uneven shard of the head's rows (and of the online proxy's / the
reference's head), the same hidden states, labels and targets. Every loss, every divergence,
offline and online proxy, ignore_index, sample weights, top-k, log-probs with entropy, sequence
log-probs and DPO: the loss (and per-token values) on every rank, the full hidden gradient and each
shard's rows of the weight and bias gradients are compared with the unsharded computation (fp64).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

V, H, HP, N = 97, 12, 10, 20
SHARDS = {2: [40, 57], 3: [30, 30, 37]}


def _problem() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    lp, ids = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, 1).topk(6, 1)
    return dict(hs=torch.randn(N, H, generator=g, dtype=torch.float64),
                ws=torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4,
                bs=torch.randn(V, generator=g, dtype=torch.float64) * 0.2,
                hp=torch.randn(N, HP, generator=g, dtype=torch.float64),
                wp=torch.randn(V, HP, generator=g, dtype=torch.float64) * 0.4,
                bp=torch.randn(V, generator=g, dtype=torch.float64) * 0.2,
                labels=labels, ids=ids, lps=lp, sw=torch.rand(N, generator=g, dtype=torch.float64) + 0.5,
                ref=torch.randn(N // 5, generator=g, dtype=torch.float64) - 8.0)


def _cases(p: dict[str, torch.Tensor], rows: slice, group: object) -> dict[str, object]:
    """name -> function(hs, ws, bs) returning the differentiable output (ws, bs: this rank's rows)."""
    from proxykd_fast.losses import (
        dpo_loss,
        linear_cross_entropy,
        linear_log_probs,
        proxy_kd_loss,
        sequence_log_probs,
    )

    vp = dict(vocab_parallel_group=group) if group is not None else {}
    wp, bp = p["wp"][rows], p["bp"][rows]
    up = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)
    h3 = (4, N // 4)

    def kd(div: str, t: float, **kw):
        return lambda hs, ws, bs: proxy_kd_loss(hs, ws, p["labels"], student_bias=bs, proxy_hidden=p["hp"],
                                                proxy_weight=wp, proxy_bias=bp, divergence=div, temperature=t,
                                                sample_weight=p["sw"], alpha=0.7, chunk_size=7, **vp, **kw)

    cases = {f"kd_{d}_T{t}": kd(d, t) for d in ("forward_kl", "reverse_kl", "jsd") for t in (1.0, 2.0)}
    cases["kd_none"] = lambda hs, ws, bs: (kd("forward_kl", 1.5, reduction="none")(hs, ws, bs) * up).sum()
    cases["kd_alone"] = kd("jsd", 1.0, nll_weight=0.0)
    def offline(t: float):
        return lambda hs, ws, bs: proxy_kd_loss(hs, ws, p["labels"], student_bias=bs, proxy_topk_ids=p["ids"],
                                                proxy_topk_logprobs=p["lps"], temperature=t, chunk_size=6, **vp)

    cases["offline_T1.0"], cases["offline_T0.5"] = offline(1.0), offline(0.5)
    cases["ce"] = lambda hs, ws, bs: linear_cross_entropy(hs, ws, p["labels"], bias=bs, chunk_size=7, **vp)
    cases["ce_none"] = lambda hs, ws, bs: (linear_cross_entropy(hs, ws, p["labels"], bias=bs, reduction="none",
                                                                **vp) * up).sum()
    cases["log_probs"] = lambda hs, ws, bs: (linear_log_probs(hs, ws, p["labels"], bias=bs, temperature=0.7,
                                                              **vp) * up).sum()

    def entropy(hs, ws, bs):
        lp, ent = linear_log_probs(hs, ws, p["labels"], bias=bs, return_entropy=True, chunk_size=5, **vp)
        return (lp * up - ent * up.flip(0)).sum()

    cases["entropy"] = entropy
    cases["sequence"] = lambda hs, ws, bs: (sequence_log_probs(hs.view(*h3, H), ws, p["labels"].view(h3), bias=bs,
                                                               **vp) * torch.arange(1.0, 5.0).double()).sum()
    cases["dpo_pre"] = lambda hs, ws, bs: dpo_loss(hs.view(*h3, H), ws, p["labels"].view(h3), bias=bs,
                                                   ref_logps=p["ref"], nll_alpha=0.5, chunk_size=6, **vp)[0]
    cases["dpo_ipo_online"] = lambda hs, ws, bs: dpo_loss(
        hs.view(*h3, H), ws, p["labels"].view(h3), bias=bs, ref_hidden=p["hp"].view(*h3, HP), ref_weight=wp,
        ref_bias=bp, loss_type="ipo", chunk_size=4, **vp)[0]
    return cases


def _run_all(p: dict[str, torch.Tensor], rows: slice, group: object) -> dict[str, torch.Tensor]:
    """Every case's output, hidden gradient and (this rank's rows of) weight / bias gradients; top-k too."""
    from proxykd_fast.losses import linear_topk

    out = {}
    for name, fn in _cases(p, rows, group).items():
        hs = p["hs"].clone().requires_grad_()
        ws, bs = p["ws"][rows].clone().requires_grad_(), p["bs"][rows].clone().requires_grad_()
        y = fn(hs, ws, bs)
        y.backward()
        out.update({f"{name}/out": y.detach(), f"{name}/dh": hs.grad, f"{name}/dw": ws.grad, f"{name}/db": bs.grad})
    vp = dict(vocab_parallel_group=group) if group is not None else {}
    for k in (1, 5, 45):  # 45 > the smallest shard: a rank contributes all of its columns
        ids, lps = linear_topk(p["hs"], p["ws"][rows], k, bias=p["bs"][rows], temperature=1.3, chunk_size=8, **vp)
        out[f"topk{k}/ids"], out[f"topk{k}/lps"] = ids, lps
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sizes = SHARDS[world]
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        p = _problem()
        res = _run_all(p, rows, dist.group.WORLD)
        from proxykd_fast.losses import linear_cross_entropy

        try:  # every rank must pass the same tokens: a rank-dependent hidden is refused on every rank
            linear_cross_entropy(p["hs"] + rank, p["ws"][rows], p["labels"], vocab_parallel_group=dist.group.WORLD)
            res["refused"] = torch.tensor(0)
        except ValueError as exc:
            res["refused"] = torch.tensor(int("hidden differs across the ranks" in str(exc)))
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single() -> dict[str, torch.Tensor]:
    """The unsharded results (one process, full head)."""
    return _run_all(_problem(), slice(0, V), None)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_results_equal_the_unsharded_ones(world: int, single: dict, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    sizes = SHARDS[world]
    assert all(int(r["refused"]) == 1 for r in ranks)
    for key, want in single.items():
        if key.endswith(("/dw", "/db")):  # each rank holds its rows of the full gradient
            got = torch.cat([r[key] for r in ranks])
        else:  # the same on every rank
            got = ranks[0][key]
            for r in ranks[1:]:
                assert torch.equal(r[key], got), f"{key} differs across ranks"
        if key.endswith("/ids"):
            assert torch.equal(got, want), key
            continue
        err = float((got.double() - want.double()).abs().max()) / max(1.0, float(want.double().abs().max()))
        assert err < 1e-10, f"{key}: rel err {err:.2e} (shards {sizes})"
