"""Bit-for-bit numerics snapshot of the public losses, for refactors that must change no result.

    python -m tests.support.snapshot_numerics save before.safetensors
    ... refactor ...
    python -m tests.support.snapshot_numerics compare before.safetensors

Every case runs a public loss on a fixed problem and records its outputs and the gradients of
hidden, weight and bias. `compare` reports each tensor that is not bitwise equal (with its max
abs difference). Bits depend on the machine's BLAS kernels, so a snapshot is only compared on
the machine that wrote it; this is a refactoring tool, not a CI test.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch
from safetensors.torch import load_file, save_file

from tests.support.loss_cases import Problem, leaves, make_problem

Case = Callable[[], dict[str, torch.Tensor]]


def _grads(out: torch.Tensor, upstream: torch.Tensor | None, *leaf: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Backward of sum(out * upstream) and the leaves' gradients."""
    total = out.sum() if upstream is None else (out * upstream.to(out.dtype)).sum()
    total.backward()
    return {f"grad{i}": t.grad for i, t in enumerate(leaf) if t is not None and t.grad is not None}


def _kd(p: Problem, backend: str, online: bool, upstream: bool = False, **kw) -> Case:
    def run() -> dict[str, torch.Tensor]:
        from proxykd_fast.losses import proxy_kd_loss

        hs, ws, bs = leaves(p.hs, p.ws, p.bs)
        proxy = (dict(proxy_hidden=p.hp, proxy_weight=p.wp, proxy_bias=p.bp) if online
                 else dict(proxy_topk_ids=p.topk_ids, proxy_topk_logprobs=p.topk_lps))
        loss, parts = proxy_kd_loss(hs, ws, p.labels, student_bias=bs, backend=backend, return_components=True,
                                    **proxy, **kw)
        up = torch.linspace(-1, 2, loss.numel()).view(loss.shape) if upstream else None
        return {"loss": loss.detach(), "nll": parts["nll"], "kd": parts["kd"], **_grads(loss, up, hs, ws, bs)}
    return run


def _ce(p: Problem, backend: str, **kw) -> Case:
    def run() -> dict[str, torch.Tensor]:
        from proxykd_fast.losses import linear_cross_entropy

        hs, ws, bs = leaves(p.hs, p.ws, p.bs)
        loss = linear_cross_entropy(hs, ws, p.labels, bias=bs, backend=backend, **kw)
        up = torch.linspace(-1, 2, loss.numel()).view(loss.shape) if loss.dim() else None
        return {"loss": loss.detach(), **_grads(loss, up, hs, ws, bs)}
    return run


def _logp(p: Problem, backend: str, **kw) -> Case:
    def run() -> dict[str, torch.Tensor]:
        from proxykd_fast.losses import linear_log_probs

        hs, ws, bs = leaves(p.hs, p.ws, p.bs)
        out = linear_log_probs(hs, ws, p.labels, bias=bs, backend=backend, **kw)
        return {"logp": out.detach(), **_grads(out, torch.linspace(-1, 2, out.numel()).view(out.shape), hs, ws, bs)}
    return run


def _topk(p: Problem, backend: str, k: int, **kw) -> Case:
    def run() -> dict[str, torch.Tensor]:
        from proxykd_fast.losses import linear_topk

        ids, lps = linear_topk(p.hs, p.ws, k, bias=p.bs, backend=backend, **kw)
        return {"ids": ids, "lps": lps}
    return run


def _dpo(p: Problem, backend: str, online_ref: bool, **kw) -> Case:
    def run() -> dict[str, torch.Tensor]:
        from proxykd_fast.losses import dpo_loss, sequence_log_probs

        hs, ws, bs = leaves(p.hs, p.ws, p.bs)
        ref = (dict(ref_hidden=p.hp, ref_weight=p.wp, ref_bias=p.bp) if online_ref else
               dict(ref_logps=sequence_log_probs(p.hp, p.wp, p.labels, bias=p.bp)))  # summed, as dpo_loss takes them
        loss, metrics = dpo_loss(hs, ws, p.labels, bias=bs, backend=backend, **ref, **kw)
        out = {"loss": loss.detach(), **{f"m_{k}": v for k, v in metrics.items()}}
        return {**out, **_grads(loss, None, hs, ws, bs)}
    return run


def _seq(p: Problem, backend: str, **kw) -> Case:
    def run() -> dict[str, torch.Tensor]:
        from proxykd_fast.losses import sequence_log_probs

        hs, ws, bs = leaves(p.hs, p.ws, p.bs)
        out = sequence_log_probs(hs, ws, p.labels, bias=bs, backend=backend, **kw)
        return {"seq": out.detach(), **_grads(out, torch.linspace(-1, 2, out.numel()), hs, ws, bs)}
    return run


def cases() -> Iterator[tuple[str, Case]]:
    """The fixed case set: every entry point x backend x a few options and dtypes."""
    big = make_problem(n=96, hs=24, hp=20, v=1024, seed=1, dtype=torch.float32)
    small = make_problem(n=37, hs=23, hp=31, v=509, seed=2, dtype=torch.float32)
    seqs = make_problem(lead=(4, 9), hs=16, hp=12, v=211, seed=3, dtype=torch.float32)
    seqs.labels[0, :3] = -100
    seqs.labels[3, :] = -100
    full = make_problem(n=64, hs=16, hp=16, v=300, seed=4, ignore_every=0, dtype=torch.float32)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
    for dname, dt in dtypes.items():
        backends = ["torch"] if dt == torch.float64 else ["torch", "triton-chunked", "triton-fused"]
        if dt == torch.float32:
            backends.append("reference")
        for be in backends:
            pb, ps, pq, pf = big.to(dt), small.to(dt), seqs.to(dt), full.to(dt)
            tag = f"{dname}/{be}"
            for div in ("forward_kl", "reverse_kl", "jsd"):
                for t in (1.0, 2.0):
                    yield f"{tag}/kd/{div}/T{t}", _kd(ps, be, True, divergence=div, temperature=t, alpha=0.7)
            yield f"{tag}/kd/fwd/weights/chunk16", _kd(pb, be, True, sample_weight=pb.sample_weight, chunk_size=16)
            yield f"{tag}/kd/fwd/none", _kd(ps, be, True, reduction="none", upstream=True, temperature=1.5)
            yield f"{tag}/kd/fwd/full", _kd(pf, be, True, alpha=2.0)
            for t in (1.0, 0.5):
                yield f"{tag}/kd/offline/T{t}", _kd(ps, be, False, temperature=t, sample_weight=ps.sample_weight)
            yield f"{tag}/kd/offline/none", _kd(pb, be, False, reduction="none", upstream=True)
            for red in ("mean", "sum", "none"):
                yield f"{tag}/ce/{red}", _ce(ps, be, reduction=red)
            yield f"{tag}/ce/chunk7/num_items", _ce(pb, be, chunk_size=7, num_items_in_batch=200)
            yield f"{tag}/ce/full", _ce(pf, be)
            for t in (1.0, 0.7):
                yield f"{tag}/logp/T{t}", _logp(ps, be, temperature=t)
            yield f"{tag}/logp/full", _logp(pf, be)
            for k in (1, 10):
                yield f"{tag}/topk/k{k}", _topk(pb, be, k)
            yield f"{tag}/topk/T2/k70", _topk(ps, be, 70, temperature=2.0)
            for lt in ("sigmoid", "ipo", "hinge"):
                yield f"{tag}/dpo/{lt}/pre", _dpo(pq, be, False, loss_type=lt, nll_alpha=0.5)
            yield f"{tag}/dpo/sigmoid/online/chunk5", _dpo(pq, be, True, chunk_size=5, average_log_prob=True)
            yield f"{tag}/dpo/robust/weights", _dpo(pq, be, False, loss_type="robust", label_smoothing=0.1,
                                                     sample_weight=torch.tensor([1.0, 0.5]).to(dt))
            yield f"{tag}/seq", _seq(pq, be)
            yield f"{tag}/seq/avg/T2", _seq(pq, be, average=True, temperature=2.0)


def snapshot() -> dict[str, torch.Tensor]:
    """Run every case; keys are 'case::output'."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    out = {}
    for name, run in cases():
        for key, t in run().items():
            out[f"{name}::{key}"] = t.detach().contiguous().clone()
    return out


def main(argv: list[str]) -> int:
    """save FILE | compare FILE."""
    if len(argv) != 2 or argv[0] not in ("save", "compare"):
        print(__doc__)
        return 2
    now = snapshot()
    if argv[0] == "save":
        save_file(now, argv[1])
        print(f"saved {len(now)} tensors")
        return 0
    before = load_file(argv[1])
    bad = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if a is None or b is None:
            bad.append(f"{key}: {'missing now' if b is None else 'new'}")
        elif a.shape != b.shape or a.dtype != b.dtype:
            bad.append(f"{key}: {a.dtype}{list(a.shape)} -> {b.dtype}{list(b.shape)}")
        elif not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item()
            bad.append(f"{key}: differs, max abs diff {diff:.3e}")
    print("\n".join(bad) if bad else f"all {len(now)} tensors bitwise equal")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
