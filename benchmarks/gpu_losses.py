"""GPU benchmark of the fused linear-head losses: ours (each Triton strategy) vs the usual baselines.

For each loss (CE, online-proxy KD, offline top-10 KD) it times forward + backward with CUDA
events, measures the peak memory beyond inputs and gradients, and reports effective TFLOP/s
(2*N*H*V per GEMM: 3 GEMMs for CE and offline KD, 4 for online KD) for:
  ours: triton (default), triton-chunked, triton-fused, torch (our chunked torch backend);
  baselines: naive torch (full logits), torch.compile of it, Liger, cut-cross-entropy (CE).
Before any speed is reported, each of ours is checked against the fp64 reference on a small
shape (loss and gradients) and against naive torch on the loss at the benchmark shape; a run
that fails is reported as FAILED with no timing. Results go to benchmarks/results/*.json.

    python benchmarks/gpu_losses.py                 # N=16384, H=4096, V=128256, bf16
    python benchmarks/gpu_losses.py --shape small   # quick check
    python benchmarks/gpu_losses.py --only triton-chunked,liger --cases ce
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"full": (16384, 4096, 128256), "small": (2048, 1024, 32768)}
CHECK_SHAPE = (384, 256, 4099)  # small, odd vocab: fp64 reference check of loss and gradients
OURS = ("triton", "triton-chunked", "triton-fused", "torch")
BASELINES = ("naive", "compiled", "liger", "cce")
GEMMS = {"ce": 3, "kd_online": 4, "kd_offline": 3}
ALPHA, TOPK = 1.0, 10
DEVICE = "cuda"


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Post-norm-like hidden states with a few heavy directions, N(0, 0.02) heads, labels, top-10 targets."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def hidden() -> torch.Tensor:
        x = torch.randn(n, h, device=DEVICE, generator=g)
        heavy = torch.randn(8, h, device=DEVICE, generator=g)
        x += torch.randn(n, 8, device=DEVICE, generator=g) @ (4.0 * heavy / math.sqrt(h))
        x[:, torch.randperm(h, device=DEVICE, generator=g)[:6]] *= 12.0  # outlier features
        return (2.0 * x / x.pow(2).mean(1, keepdim=True).sqrt()).to(dtype)

    inputs = {
        "hidden": hidden(), "weight": (0.02 * torch.randn(v, h, device=DEVICE, generator=g)).to(dtype),
        "proxy_hidden": hidden(), "proxy_weight": (0.02 * torch.randn(v, h, device=DEVICE, generator=g)).to(dtype),
        "labels": torch.randint(0, v, (n,), device=DEVICE, generator=g),
    }
    inputs["labels"][torch.rand(n, device=DEVICE, generator=g) < 0.05] = -100
    from proxykd_fast.losses import linear_topk

    ids, lps = linear_topk(inputs["proxy_hidden"], inputs["proxy_weight"], TOPK, backend="torch")
    inputs["topk_ids"], inputs["topk_logprobs"] = ids, lps
    return inputs


# ---- the losses -------------------------------------------------------------------------------


def ours(case: str, backend: str, x: dict, divergence: str, temperature: float) -> Callable[[], torch.Tensor]:
    """Closure computing our loss for `case` with `backend` (leaves: x['hidden'], x['weight'])."""
    from proxykd_fast.losses import linear_cross_entropy, proxy_kd_loss

    if case == "ce":
        return lambda: linear_cross_entropy(x["hidden"], x["weight"], x["labels"], backend=backend)
    if case == "kd_online":
        return lambda: proxy_kd_loss(x["hidden"], x["weight"], x["labels"], proxy_hidden=x["proxy_hidden"],
                                     proxy_weight=x["proxy_weight"], alpha=ALPHA, temperature=temperature,
                                     divergence=divergence, backend=backend)
    return lambda: proxy_kd_loss(x["hidden"], x["weight"], x["labels"], proxy_topk_ids=x["topk_ids"],
                                 proxy_topk_logprobs=x["topk_logprobs"], alpha=ALPHA, temperature=temperature,
                                 backend=backend)


def naive_loss(case: str, x: dict, divergence: str, temperature: float) -> torch.Tensor:
    """Plain torch with the full [N, V] fp32 logits, the way a training script writes it."""
    T, valid = temperature, x["labels"] != -100
    zs = F.linear(x["hidden"], x["weight"]).float()
    nll = F.cross_entropy(zs, x["labels"], ignore_index=-100, reduction="sum")
    if case == "ce":
        return nll / valid.sum().clamp(min=1)
    log_q = torch.log_softmax(zs / T, -1)
    if case == "kd_offline":
        log_p = torch.log_softmax(x["topk_logprobs"] / T, -1)
        kd = (log_p.exp() * (log_p - log_q.gather(1, x["topk_ids"]))).sum(-1)
    else:
        with torch.no_grad():
            log_p = torch.log_softmax(F.linear(x["proxy_hidden"], x["proxy_weight"]).float() / T, -1)
        if divergence == "forward_kl":
            kd = (log_p.exp() * (log_p - log_q)).sum(-1)
        elif divergence == "reverse_kl":
            kd = (log_q.exp() * (log_q - log_p)).sum(-1)
        else:
            log_m = torch.logaddexp(log_p + math.log(0.5), log_q + math.log(0.5))
            kd = 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
    total = nll + ALPHA * T * T * (kd * valid).sum()
    return total / valid.sum().clamp(min=1)


@torch.no_grad()
def naive_reference(case: str, x: dict, divergence: str, temperature: float, rows: int = 2048) -> float:
    """The naive loss at the benchmark shape, computed over row slices so it cannot run out of memory."""
    total, n_valid = 0.0, int((x["labels"] != -100).sum())
    for start in range(0, x["labels"].shape[0], rows):
        part = {k: (v[start:start + rows] if k not in ("weight", "proxy_weight") else v) for k, v in x.items()}
        valid = int((part["labels"] != -100).sum())
        total += float(naive_loss(case, part, divergence, temperature)) * max(valid, 1)
    return total / max(n_valid, 1)


_COMPILED: dict = {}


def baseline(name: str, case: str, x: dict, divergence: str, temperature: float) -> Callable[[], torch.Tensor] | str:
    """Closure for a baseline, or a string saying why it does not apply / is not installed."""
    if name == "naive":
        return lambda: naive_loss(case, x, divergence, temperature)
    if name == "compiled":
        key = (case, divergence, temperature)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(lambda inp: naive_loss(case, inp, divergence, temperature))
        fn = _COMPILED[key]
        return lambda: fn(x)
    if name == "liger":
        try:
            if case == "ce":
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

                mod = LigerFusedLinearCrossEntropyLoss()
                return lambda: mod(x["weight"], x["hidden"], x["labels"])
            if case == "kd_online":
                from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

                mod = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=ALPHA, beta=0.5,
                                              temperature=temperature)
                return lambda: mod(x["hidden"], x["weight"], x["proxy_hidden"], x["proxy_weight"], x["labels"])
        except ImportError:
            return "not installed"
        return "no offline top-k loss"
    if case != "ce":
        return "CE only"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        return "not installed"
    return lambda: cce(x["hidden"], x["weight"], x["labels"])


# ---- measurement ------------------------------------------------------------------------------


def _leaves(x: dict) -> list[torch.Tensor]:
    return [x["hidden"], x["weight"]]


def fwd_bwd(fn: Callable[[], torch.Tensor], x: dict) -> torch.Tensor:
    """One forward + backward with fresh gradients."""
    for t in _leaves(x):
        t.grad = None
    loss = fn()
    loss.backward()
    return loss.detach()


def time_ms(fn: Callable[[], torch.Tensor], x: dict, warmup: int, iters: int) -> float:
    """Median fwd+bwd time in ms over `iters` runs after `warmup` runs, with CUDA events."""
    for _ in range(warmup):
        fwd_bwd(fn, x)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fwd_bwd(fn, x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], torch.Tensor], x: dict) -> int:
    """Peak allocated memory of one fwd+bwd beyond the inputs and the gradients it returns."""
    for t in _leaves(x):
        t.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd(fn, x)
    torch.cuda.synchronize()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in _leaves(x) if t.grad is not None)
    return torch.cuda.max_memory_allocated() - base - grads


def check_small(case: str, backend: str, divergence: str, temperature: float, dtype: torch.dtype) -> str:
    """'' if our backend matches the fp64 reference on CHECK_SHAPE (loss and grads), else why not."""
    x = make_inputs(*CHECK_SHAPE, dtype, seed=1)
    for t in _leaves(x):
        t.requires_grad_()
    loss = fwd_bwd(ours(case, backend, x, divergence, temperature), x)
    got = [loss.double()] + [t.grad.double() for t in _leaves(x)]
    ref_x = {k: (v.detach().double() if v.is_floating_point() and k != "topk_logprobs" else v) for k, v in x.items()}
    for t in _leaves(ref_x):
        t.requires_grad_()
    ref_loss = fwd_bwd(ours(case, "reference", ref_x, divergence, temperature), ref_x)
    ref = [ref_loss] + [t.grad for t in _leaves(ref_x)]
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("loss", "d_hidden", "d_weight"), got, ref):
        err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6)
        if not err <= tol:
            return f"{name} off the fp64 reference by {err:.1e} (tol {tol})"
    return ""


def run_case(case: str, args: argparse.Namespace, x: dict, n: int, h: int, v: int) -> list[dict]:
    """Check, time and measure every selected implementation of one loss."""
    names = [name for name in (*OURS, *BASELINES) if not args.only or name in args.only]
    flops = GEMMS[case] * 2.0 * n * h * v
    ref_loss, rows = naive_reference(case, x, args.divergence, args.temperature), []
    for name in names:
        row = {"case": case, "impl": name, "status": "ok"}
        rows.append(row)
        if name in OURS:
            why = check_small(case, name, args.divergence, args.temperature, args.dtype)
            fn = ours(case, name, x, args.divergence, args.temperature)
            if name == "triton-fused" and case == "kd_online":
                row["note"] = "online proxy runs on the chunked epilogue"
        else:
            why, fn = "", baseline(name, case, x, args.divergence, args.temperature)
            if isinstance(fn, str):
                row["status"] = f"skipped: {fn}"
                continue
        if why:
            row["status"] = f"FAILED correctness: {why}"
            continue
        try:
            loss = float(fwd_bwd(fn, x))
            row["loss"] = loss
            if name in OURS and not abs(loss - ref_loss) <= 2e-3 * max(1.0, abs(ref_loss)):
                row["status"] = f"FAILED correctness: loss {loss:.6f} vs naive {ref_loss:.6f}"
                continue
            row["ms"] = time_ms(fn, x, args.warmup, args.iters)
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            row["peak_extra_gib"] = peak_extra_bytes(fn, x) / 2**30
        except torch.OutOfMemoryError:
            row["status"] = "OOM"
        finally:
            for t in _leaves(x):
                t.grad = None
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    """Side-by-side table of one case."""
    print(f"\n{rows[0]['case']}:")
    print(f"  {'impl':<16}{'ms':>10}{'TFLOP/s':>10}{'peak extra GiB':>16}{'loss':>12}  status")
    for r in rows:
        ms = f"{r['ms']:.2f}" if "ms" in r else "-"
        tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
        mem = f"{r['peak_extra_gib']:.2f}" if "peak_extra_gib" in r else "-"
        loss = f"{r['loss']:.5f}" if "loss" in r else "-"
        note = f" ({r['note']})" if "note" in r else ""
        print(f"  {r['impl']:<16}{ms:>10}{tf:>10}{mem:>16}{loss:>12}  {r['status']}{note}")


def main() -> None:
    """Parse options, run every case, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="full")
    parser.add_argument("--cases", default="ce,kd_online,kd_offline", help="comma list of " + ",".join(GEMMS))
    parser.add_argument("--only", default="", help="comma list of implementations: " + ",".join(OURS + BASELINES))
    parser.add_argument("--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default="", help="JSON path (default: benchmarks/results/gpu_losses_<device>_<time>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_losses.py needs a CUDA GPU (written for H100/H200); none is visible, nothing was measured.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter would run the kernels on the CPU.")
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.only = [s for s in args.only.split(",") if s]
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in GEMMS] + [s for s in args.only if s not in OURS + BASELINES]
    if unknown:
        sys.exit(f"unknown case or implementation: {unknown}")

    n, h, v = SHAPES[args.shape]
    device = torch.cuda.get_device_name()
    print(f"{device}: N={n} H={h} V={v} {args.dtype}, divergence={args.divergence}, T={args.temperature}")
    x = make_inputs(n, h, v, args.dtype)
    for t in _leaves(x):
        t.requires_grad_()
    results = []
    for case in cases:
        rows = run_case(case, args, x, n, h, v)
        print_table(rows)
        results.extend(rows)

    import triton

    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / (
        f"gpu_losses_{device.replace(' ', '_')}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "shape": [n, h, v],
            "dtype": str(args.dtype), "divergence": args.divergence, "temperature": args.temperature,
            "topk": TOPK, "alpha": ALPHA, "flops_per_gemm": 2 * n * h * v, "gemms": GEMMS}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
