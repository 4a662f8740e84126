"""Why our bf16 CE is slower than a plain bf16 GEMM + fp32 CE on an AMX CPU, and a prototype that is not.

The case: CE, N=4096, H=1024, V=32000, bf16, 2 threads. This script measures, in one process
and interleaved (so machine load hits every variant alike; times are per step, min and median
over --repeats rounds):

  gemms      the GEMM shapes of one step, bf16 (AMX) against fp32, and the dtype conversions
  ours       proxykd_fast.losses.linear_cross_entropy(backend="torch"), with a profiler breakdown
  naive      bf16 F.linear, .float(), F.cross_entropy, autograd (bf16 backward GEMMs)
  proto      a prototype of the chunk loop with the proposed dW path: a bf16 GEMM per chunk
             (oneDNN accumulates in fp32 inside; one bf16 rounding per chunk) added into the fp32
             dW accumulator, instead of today's fp32 GEMM on upcast operands; at several chunk
             sizes, with G.T as left operand ("bf16") or as dW.T = x.T @ G ("bf16nn")
  error      every variant's dW / dX / loss error against fp64 on the same bf16 inputs

    python benchmarks/bf16_cpu.py                  # the issue's shape
    python benchmarks/bf16_cpu.py --n 1024 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def inputs(n: int, h: int, v: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).bfloat16()
    w = (torch.randn(v, h, generator=g) * 0.02).bfloat16()
    y = torch.randint(0, v, (n,), generator=g)
    y[::50] = IGNORE
    return x, w, y


def timeit(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Interleaved rounds: every function once per round, after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"min_s": min(t), "median_s": statistics.median(t), "times_s": t} for k, t in times.items()}


def ce_proto(x: Tensor, w: Tensor, y: Tensor, chunk: int, dw_mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """Our chunk loop for CE (forward + backward in one pass), with a choice of dW path.

    dw_mode "fp32": dW += S_fp32.T @ x.float() (today's CPU path); "bf16": dW += (G.T @ x) in bf16,
    G = bf16 dlogits (shared with dX), added into fp32 dW; "bf16nn": the same product as
    dW.T += x.T @ G, both operands row-major (oneDNN's fast bf16 layout; G.T as the left operand
    takes a slower path), into a transposed fp32 accumulator transposed back once at the end;
    "bf16t": that product added transposed into the usual [V, H] accumulator.
    """
    n, v = x.shape[0], w.shape[0]
    valid = y != IGNORE
    denom = valid.sum().clamp(min=1).float()
    buf = torch.empty(chunk, v)
    dx = torch.empty_like(x)
    dw = torch.zeros(w.shape[::-1] if dw_mode == "bf16nn" else w.shape)
    loss = torch.zeros((), dtype=torch.float64)
    for i in range(0, n, chunk):
        c = min(chunk, n - i)
        xs, ys, vs = x[i:i + c], y[i:i + c], valid[i:i + c]
        S = buf[:c]
        S.copy_(torch.mm(xs, w.t()))  # bf16 GEMM, bf16 out, widened (as logits_into does on CPU)
        torch.log_softmax(S, 1, out=S)
        ys0 = torch.where(vs, ys, torch.zeros_like(ys))
        coef = vs.float() / denom
        loss += (-(S.gather(1, ys0[:, None]).view(-1)) * coef).sum(dtype=torch.float64)
        S.exp_().mul_(coef[:, None])
        S.scatter_add_(1, ys0[:, None], -coef[:, None])
        G = S.to(torch.bfloat16)
        dx[i:i + c] = torch.mm(G, w)
        if dw_mode == "fp32":
            dw.addmm_(S.t(), xs.float())
        elif dw_mode == "bf16":
            dw.add_(torch.mm(G.t(), xs))
        elif dw_mode == "bf16t":  # the fast layout, added back transposed (keeps a [V, H] accumulator)
            dw.add_(torch.mm(xs.t().contiguous(), G).t())
        else:
            part = torch.mm(xs.t().contiguous(), G)
            if i == 0:
                dw.copy_(part)
            else:
                dw.add_(part)
    return loss.float(), dx, (dw.t() if dw_mode == "bf16nn" else dw).to(w.dtype)


def naive(x: Tensor, w: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = F.cross_entropy(F.linear(xg, wg).float(), y, ignore_index=IGNORE)
    loss.backward()
    return loss.detach(), xg.grad, wg.grad


def ours(x: Tensor, w: Tensor, y: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    from proxykd_fast.losses import linear_cross_entropy

    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = linear_cross_entropy(xg, wg, y, backend="torch", chunk_size=chunk)
    loss.backward()
    return loss.detach(), xg.grad, wg.grad


def exact(x: Tensor, w: Tensor, y: Tensor, rows: int = 512) -> tuple[Tensor, Tensor, Tensor]:
    """fp64 loss, dX, dW on the same (bf16-valued) inputs, in row chunks."""
    x64, w64 = x.double(), w.double().requires_grad_()
    valid = y != IGNORE
    denom = valid.sum().clamp(min=1).double()
    dx, loss = torch.empty_like(x64), torch.zeros((), dtype=torch.float64)
    for i in range(0, x.shape[0], rows):
        xc = x64[i:i + rows].requires_grad_()
        lc = F.cross_entropy(xc @ w64.T, y[i:i + rows], ignore_index=IGNORE, reduction="sum") / denom
        lc.backward()
        dx[i:i + rows], loss = xc.grad, loss + lc.detach()
    return loss, dx, w64.grad


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def profile_ours(x: Tensor, w: Tensor, y: Tensor) -> list[tuple[str, float, int]]:
    """(op, self CPU seconds, calls) of one step of ours, heaviest first."""
    from torch.profiler import ProfilerActivity, profile

    ours(x, w, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours(x, w, y)
    rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])[:12]


def gemm_table(n: int, h: int, v: int, chunk: int, repeats: int) -> dict[str, dict]:
    """One chunk's GEMMs and conversions, bf16 vs fp32 (times x chunks = a step's share)."""
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(chunk, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.02
    s = torch.randn(chunk, v, generator=g)
    xb, wb, sb = xs.bfloat16(), w.bfloat16(), s.bfloat16()
    out32 = torch.empty(chunk, v)
    dw32 = torch.zeros(v, h)
    return timeit({
        "logits bf16 (mm)": lambda: torch.mm(xb, wb.t()),
        "logits fp32 (mm)": lambda: torch.mm(xs, w.t()),
        "dX bf16 (G @ W)": lambda: torch.mm(sb, wb),
        "dW fp32 (addmm_, today)": lambda: dw32.addmm_(s.t(), xs),
        "dW bf16 mm(G.t(), x)": lambda: torch.mm(sb.t(), xb),
        "dW.T bf16 mm(x.t().contiguous(), G) (proposed)": lambda: torch.mm(xb.t().contiguous(), sb),
        "fp32 += bf16 [V, H] (accumulate)": lambda: dw32.add_(wb),
        "S bf16 -> fp32 copy": lambda: out32.copy_(sb),
        "S fp32 -> bf16 cast": lambda: s.to(torch.bfloat16),
        "x bf16 -> fp32": lambda: xb.float(),
    }, repeats)


def _memory_worker(variant: str, args: argparse.Namespace) -> None:
    """Peak resident MB above the post-warm-up baseline of one variant (benchmarks/_cpu_measure.py)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _cpu_measure import measure

    x, w, y = inputs(args.n, args.h, args.v)
    fns = {"naive": lambda: naive(x, w, y), "ours": lambda: ours(x, w, y),
           "prototype": lambda: ce_proto(x, w, y, args.proto_chunk, "bf16nn")}

    def settle() -> None:
        from proxykd_fast.losses import release_workspace

        release_workspace()
    r = measure(lambda: fns[variant]() and None, 2, settle)
    print(json.dumps({"variant": variant, "peak_above_inputs_mb": r["peak_above_inputs_mb"]}))


def memory_table(args: argparse.Namespace) -> dict[str, float]:
    """Each variant's peak memory, one process each (the glibc mmap threshold fixed as in the suite)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _cpu_measure import MALLOC_ENV

    out = {}
    for variant in ("naive", "ours", "prototype"):
        cmd = [sys.executable, __file__, "--memory-worker", variant, "--n", str(args.n), "--h", str(args.h),
               "--v", str(args.v), "--threads", str(args.threads), "--proto-chunk", str(args.proto_chunk)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV,
                                                                        "OMP_NUM_THREADS": str(args.threads)})
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_above_inputs_mb"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunks", default="1024,2048,4096")
    ap.add_argument("--modes", default="fp32,bf16,bf16t,bf16nn", help="prototype dW paths to time")
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory", action="store_true", help="only the peak-memory table (one process per variant)")
    ap.add_argument("--proto-chunk", type=int, default=2048, help="the prototype's chunk rows in the memory table")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        return _memory_worker(args.memory_worker, args)
    if args.memory:
        mem = memory_table(args)
        print(f"peak MB above inputs, N={args.n} H={args.h} V={args.v} bf16: "
              + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"shape": vars(args), "peak_above_inputs_mb": mem}, fh, indent=1)
        return None
    x, w, y = inputs(args.n, args.h, args.v)
    chunks = [int(c) for c in args.chunks.split(",")]
    out: dict = {"shape": vars(args), "torch": torch.__version__,
                 "mkldnn_bf16": torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()}
    try:
        torch.mm(x[:2], w[:2].t(), out_dtype=torch.float32)
        out["mm_out_dtype_cpu"] = "available"
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        out["mm_out_dtype_cpu"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    print(f"torch {torch.__version__}, {args.threads} threads; torch.mm(bf16, bf16, out_dtype=fp32) on CPU: "
          f"{out['mm_out_dtype_cpu']}")

    print(f"\nGEMMs and conversions of one {chunks[0]}-row chunk (x {-(-args.n // chunks[0])} chunks per step):")
    out["gemms"] = gemm_table(args.n, args.h, args.v, chunks[0], args.repeats)
    for k, r in out["gemms"].items():
        print(f"  {k:36s} {r['min_s'] * 1e3:8.1f} ms (median {r['median_s'] * 1e3:.1f})")

    print("\nprofile of one step of ours (self CPU time):")
    out["profile"] = profile_ours(x, w, y)
    for op, secs, calls in out["profile"]:
        print(f"  {op:40s} {secs:7.3f} s  x{calls}")

    fns = {"naive bf16 GEMM + fp32 CE": lambda: naive(x, w, y), "ours (today)": lambda: ours(x, w, y)}
    for c in chunks:
        for mode in args.modes.split(","):
            fns[f"prototype {mode} dW, chunk {c}"] = lambda c=c, mode=mode: ce_proto(x, w, y, c, mode)
    print(f"\nforward + backward, N={args.n} H={args.h} V={args.v} bf16 ({args.repeats} interleaved rounds):")
    out["steps"] = timeit(fns, args.repeats)
    ref = exact(x, w, y)
    out["errors"] = {}
    for k, fn in fns.items():
        loss, dx, dw = fn()
        out["errors"][k] = {"loss": abs(float(loss) - float(ref[0])) / abs(float(ref[0])),
                            "dX": rel(dx, ref[1]), "dW": rel(dw, ref[2])}
        r, e = out["steps"][k], out["errors"][k]
        print(f"  {k:34s} {r['min_s']:6.2f} s (median {r['median_s']:.2f})   error loss {e['loss']:.1e} "
              f"dX {e['dX']:.1e} dW {e['dW']:.1e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
