"""CPU benchmark of the fused DPO + NLL loss against Liger's LigerFusedLinearDPOLoss, side by side.

Main shape (issue 4): B=8 pairs (2B=16 rows), T=512, H=1024, V=32000, fp32, 2 threads, sigmoid DPO
with beta=0.1 plus the chosen NLL (nll_alpha = Liger's alpha = 1, Proxy-KD's L = NLL + DPO),
forward + backward for hidden and weight. Both sides use an online reference model (Liger takes
no precomputed one); ours also runs with precomputed ref_logps. Two label masks: "ragged" (prompt
and right padding masked, as DPO batches are) and "full" (every position is a completion token:
nothing to skip, the worst case for token chunking). Then a long-sequence sweep, B=1 pair and
T in {512, 2048, 8192}, all tokens valid, for peak memory.

Each variant runs in a fresh process, in `--rounds` interleaved rounds (the median is taken over
every timed step of every round), and each loss is compared with the fp64 value of the same batch. Peak memory = max VmRSS sampled every 5 ms by a thread
during the timed steps, minus VmRSS just before them (inputs built, warm-up done, our cached
workspace released so its allocation is counted); VmHWM after /proc/self/clear_refs is recorded
as a cross-check where the kernel allows it. The parent kills a variant whose RSS crosses a guard
(default: 60% of MemAvailable) and reports it as exceeding the guard. Time = median of the timed
steps. Writes benchmarks/results/cpu_dpo[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from _cpu_measure import MALLOC_ENV

HERE = Path(__file__).resolve().parent
VARIANTS = ("gemm_floor", "ours_online", "ours_precomputed", "liger_compiled", "liger_eager")
BETA, NLL_ALPHA = 0.1, 1.0


# ------------------------------------------------------------------------------------------
# Worker side (one variant per process)


def _status_kb(field: str, pid: str = "self") -> int:
    """A field of /proc/<pid>/status in kB (0 if missing)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Background thread sampling VmRSS every `period` seconds; `peak_mb` is the max seen."""

    def __init__(self, period: float = 0.005) -> None:
        self.period, self.peak_kb, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb("VmRSS"))
            time.sleep(self.period)

    def __enter__(self) -> RssSampler:
        self.peak_kb = _status_kb("VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _status_kb("VmRSS"))

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


def build_inputs(B: int, T: int, H: int, V: int, mask: str, seed: int = 0) -> dict:
    """Unit-scale hidden, N(0, 0.02) heads; the reference is a perturbed copy of the policy."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.02
    rh = 0.9 * h + 0.45 * torch.randn(2 * B, T, H, generator=g)
    rw = w + 0.005 * torch.randn(V, H, generator=g)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    if mask == "ragged":  # prompt of T/8..T/4 tokens, completion of T/4..(T - prompt), right padding
        for r in range(2 * B):
            p = int(torch.randint(T // 8, T // 4 + 1, (1,), generator=g))
            n = int(torch.randint(T // 4, T - p + 1, (1,), generator=g))
            y[r, :p] = -100
            y[r, p + n:] = -100
    return dict(h=h, w=w, rh=rh, rw=rw, y=y)


def make_step(variant: str, x: dict, chunk: int | None):
    """A closure doing one forward + backward of `variant`; returns (loss, chosen logps mean)."""
    import torch

    h = x["h"].clone().requires_grad_()
    w = x["w"].clone().requires_grad_()
    y, rh, rw = x["y"], x["rh"], x["rw"]

    def finish(loss, chosen_mean):
        loss.backward()
        h.grad = w.grad = None
        return float(loss.detach()), float(chosen_mean.detach())

    if variant.startswith("ours"):
        from proxykd_fast.losses import dpo_loss, release_workspace, sequence_log_probs

        kw = dict(beta=BETA, nll_alpha=NLL_ALPHA, chunk_size=chunk, backend="torch")
        if variant == "ours_precomputed":
            with torch.no_grad():
                kw["ref_logps"] = sequence_log_probs(rh, rw, y, chunk_size=chunk)
            release_workspace()
        else:
            kw.update(ref_hidden=rh, ref_weight=rw)

        def step():
            loss, m = dpo_loss(h, w, y, **kw)
            return finish(loss, m["logps/chosen"])
        return step
    if variant.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        fn = LigerFusedLinearDPOLoss(beta=BETA, alpha=NLL_ALPHA, compute_nll_loss=True, use_ref_model=True,
                                     compiled=variant == "liger_compiled", average_log_prob=False)

        def step():
            loss, aux = fn(w, h, y, ref_input=rh, ref_weight=rw)
            return finish(loss, aux[0].mean())
        return step
    if variant == "fp64_ref":  # the exact loss (ours in fp64, forward only) to judge each variant's fp32 error
        from proxykd_fast.losses import dpo_loss

        def step():
            with torch.no_grad():
                loss, m = dpo_loss(x["h"].double(), x["w"].double(), y, ref_hidden=rh.double(),
                                   ref_weight=rw.double(), beta=BETA, nll_alpha=NLL_ALPHA, backend="torch")
            return float(loss), float(m["logps/chosen"])
        return step
    if variant == "gemm_floor":
        # the four GEMMs any exact method needs over the completion tokens: reference logits,
        # policy logits, dX and dW (policy), in chunks, nothing else
        valid = (y != -100).view(-1).nonzero().view(-1)
        hv, rhv = x["h"].view(-1, h.shape[-1])[valid], rh.view(-1, rh.shape[-1])[valid]
        rows = chunk or 2048

        def step():
            dw = torch.zeros_like(w)
            dx = torch.empty_like(hv)
            s = torch.empty(min(rows, hv.shape[0]), w.shape[0])
            with torch.no_grad():
                for i in range(0, hv.shape[0], rows):
                    c = min(rows, hv.shape[0] - i)
                    torch.mm(rhv[i:i + c], rw.t(), out=s[:c])
                    torch.mm(hv[i:i + c], w.t(), out=s[:c])
                    torch.mm(s[:c], w, out=dx[i:i + c])
                    dw.addmm_(s[:c].t(), hv[i:i + c])
            return float("nan"), float("nan")
        return step
    raise ValueError(f"unknown variant {variant!r}")


def worker(args: argparse.Namespace) -> None:
    """Measure one variant in this process and print a RESULT JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    x = build_inputs(args.B, args.T, args.H, args.V, args.mask)
    step = make_step(args.worker, x, args.chunk)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - t0
    if args.worker.startswith("ours"):
        from proxykd_fast.losses import release_workspace

        release_workspace()
    gc.collect()
    base_kb = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        hwm_ok = True
    except OSError:
        hwm_ok = False
    times, out = [], (float("nan"), float("nan"))
    with RssSampler() as sampler:
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - t)
    hwm_kb = _status_kb("VmHWM") if hwm_ok else 0
    s = sorted(times)
    result = dict(variant=args.worker, B=args.B, T=args.T, mask=args.mask, times_s=times, median_s=s[len(s) // 2],
                  min_s=s[0], warmup_s=warmup_s, peak_mb=sampler.peak_mb - base_kb / 1024,
                  hwm_peak_mb=(hwm_kb - base_kb) / 1024 if hwm_ok else None, baseline_mb=base_kb / 1024,
                  loss=out[0], logps_chosen=out[1],
                  valid_tokens=int((x["y"] != -100).sum()))
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------
# Driver side


def mem_available_mb() -> float:
    """MemAvailable from /proc/meminfo in MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 8192.0


def run_variant(variant: str, B: int, T: int, mask: str, args: argparse.Namespace, repeats: int) -> dict:
    """Run one variant in a child process under an RSS guard; returns its result (or the failure)."""
    warmup = args.warmup if variant != "liger_compiled" else max(args.warmup, 1)
    if variant == "fp64_ref":
        warmup, repeats = 0, 1
    cmd = [sys.executable, __file__, "--worker", variant, "--B", str(B), "--T", str(T), "--H", str(args.H),
           "--V", str(args.V), "--mask", mask, "--threads", str(args.threads), "--repeats", str(repeats),
           "--warmup", str(warmup)] + (["--chunk", str(args.chunk)] if args.chunk else [])
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(args.threads)}
    guard_mb = args.guard_mb or 0.6 * mem_available_mb()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed_at = 0.0
    while proc.poll() is None:
        rss = _status_kb("VmRSS", str(proc.pid)) / 1024
        if rss > guard_mb:
            killed_at = rss
            proc.kill()
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if killed_at:
        return dict(variant=variant, B=B, T=T, mask=mask, failed=f"RSS passed the {guard_mb:.0f} MB guard",
                    peak_mb=None, rss_at_kill_mb=killed_at)
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return dict(variant=variant, B=B, T=T, mask=mask, failed=(stderr or stdout)[-1500:], peak_mb=None)


def merge_rounds(rs: list[dict], exact_loss: float | None) -> dict:
    """One result from several rounds: median over every timed step, max peak; loss error vs fp64."""
    ok = [r for r in rs if not r.get("failed")]
    if not ok:
        return rs[-1]
    times = sorted(t for r in ok for t in r["times_s"])
    out = dict(ok[0], times_s=times, median_s=times[len(times) // 2], min_s=times[0], rounds=len(ok),
               peak_mb=max(r["peak_mb"] for r in ok), round_medians_s=[r["median_s"] for r in ok],
               round_peaks_mb=[r["peak_mb"] for r in ok])
    hwm = [r["hwm_peak_mb"] for r in ok if r.get("hwm_peak_mb") is not None]
    out["hwm_peak_mb"] = max(hwm) if hwm else None
    if exact_loss is not None and out["loss"] == out["loss"]:
        out["loss_rel_err_vs_fp64"] = abs(out["loss"] - exact_loss) / abs(exact_loss)
    return out


def fmt(r: dict) -> str:
    """One table line."""
    if r.get("failed"):
        return f"  {r['variant']:17s} FAILED: {r['failed'].strip().splitlines()[-1][:100]}"
    hwm = "" if r.get("hwm_peak_mb") is None else f" (HWM {r['hwm_peak_mb']:6.0f})"
    err = "" if r.get("loss_rel_err_vs_fp64") is None else f" (rel err vs fp64 {r['loss_rel_err_vs_fp64']:.1e})"
    return (f"  {r['variant']:17s} {r['median_s']:7.2f} s (min {r['min_s']:6.2f}, warm-up {r['warmup_s']:6.1f})  "
            f"peak {r['peak_mb']:7.0f} MB{hwm}  loss {r['loss']:.6f}{err}")


def plot(record: dict, path: Path) -> None:
    """Left: step time per variant and mask; right: peak memory vs T for the long-sequence sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    masks = list(record["main"])
    names = [v for v in VARIANTS if any(v in record["main"][m] for m in masks)]  # fp64_ref is not plotted
    width = 0.8 / max(1, len(masks))
    for i, m in enumerate(masks):
        vals = [record["main"][m].get(v, {}).get("median_s") or 0.0 for v in names]
        bars = ax0.bar([j + i * width for j in range(len(names))], vals, width, label=f"mask={m}")
        for b, v in zip(bars, vals):
            if v:
                ax0.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax0.set_xticks([j + width * (len(masks) - 1) / 2 for j in range(len(names))])
    ax0.set_xticklabels(names, rotation=20, fontsize=8)
    s = record["shape"]
    ax0.set_ylabel("forward + backward, s (median)")
    ax0.set_title(f"B={s['B']} pairs, T={s['T']}, H={s['H']}, V={s['V']}, fp32, {record['threads']} threads", fontsize=9)
    ax0.legend(fontsize=8)
    for v, style in (("ours_online", "o-"), ("liger_compiled", "s-"), ("liger_eager", "^--")):
        pts = [r for r in record["long"] if r["variant"] == v]
        if not pts:
            continue
        ok = [r for r in pts if r.get("peak_mb") is not None]
        ax1.plot([r["T"] for r in ok], [r["peak_mb"] for r in ok], style, label=v)
        for r in pts:
            if r.get("failed") and r.get("rss_at_kill_mb"):
                ax1.plot([r["T"]], [r["rss_at_kill_mb"]], "x", color="red", markersize=10)
                ax1.annotate("killed at guard", (r["T"], r["rss_at_kill_mb"]), fontsize=7)
    if not record["long"]:
        ax1.set_visible(False)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("T (tokens per sequence), B=1 pair, all tokens valid")
    ax1.set_ylabel("peak RSS above inputs, MB")
    ax1.set_title("Peak memory vs sequence length", fontsize=9)
    if record["long"]:
        ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Run the main comparison and the long-sequence sweep; print, save JSON and the plot."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the main variants")
    ap.add_argument("--chunk", type=int, default=None, help="our chunk_size in tokens (default: library default)")
    ap.add_argument("--masks", default="ragged,full")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--long", default="512,2048,8192", help="T values of the B=1 sweep ('' to skip)")
    ap.add_argument("--long-variants", default="ours_online,liger_compiled")
    ap.add_argument("--long-repeats", type=int, default=1)
    ap.add_argument("--guard-mb", type=float, default=0.0, help="kill a variant above this RSS (0: 60%% of free)")
    ap.add_argument("--quick", action="store_true", help="small shapes, smoke run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--mask", default="ragged", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.B, args.T, args.H, args.V, args.repeats, args.rounds = 2, 64, 128, 2000, 2, 1
        args.long = args.long if args.long != "512,2048,8192" else "64,256,1024"
    if args.worker:
        return worker(args)
    out = Path(args.out or HERE / "results" / ("cpu_dpo_quick.json" if args.quick else "cpu_dpo.json"))

    print(f"CPU fused DPO + NLL: B={args.B} pairs, T={args.T}, H={args.H}, V={args.V}, fp32, {args.threads} threads, "
          f"{os.cpu_count()}-core {platform.machine()}; load avg {os.getloadavg()[0]:.2f}")
    main_results: dict[str, dict] = {}
    variants = [v for v in args.variants.split(",") if v]
    for mask in [m for m in args.masks.split(",") if m]:
        print(f"mask={mask}:")
        exact = run_variant("fp64_ref", args.B, args.T, mask, args, 1)
        main_results[mask] = {"fp64_ref": exact}
        print(f"  fp64 loss {exact.get('loss')}", flush=True)
        rounds: dict[str, list[dict]] = {v: [] for v in variants}
        for k in range(args.rounds):  # interleave the variants so background load hits them alike
            for v in variants:
                r = run_variant(v, args.B, args.T, mask, args, args.repeats)
                rounds[v].append(r)
                print(f"  round {k + 1}" + fmt(r), flush=True)
        for v, rs in rounds.items():
            main_results[mask][v] = merged = merge_rounds(rs, exact.get("loss"))
            print("  merged " + fmt(merged), flush=True)

    summary: dict[str, dict] = {}
    for mask, res in main_results.items():
        ours, s = res.get("ours_online", {}), {}
        if ours.get("failed") or not ours:
            continue
        for peer in ("liger_compiled", "liger_eager"):
            p = res.get(peer)
            if p and not p.get("failed"):
                s[f"speedup_vs_{peer}"] = p["median_s"] / ours["median_s"]
                s[f"peak_mem_ratio_vs_{peer}"] = ours["peak_mb"] / max(p["peak_mb"], 1e-9)
                s[f"loss_rel_diff_vs_{peer}"] = abs(ours["loss"] - p["loss"]) / abs(p["loss"])
        pre = res.get("ours_precomputed")
        if pre and not pre.get("failed"):
            s["precomputed_time_ratio"] = pre["median_s"] / ours["median_s"]
            if res.get("liger_compiled") and not res["liger_compiled"].get("failed"):
                s["precomputed_speedup_vs_liger_compiled"] = res["liger_compiled"]["median_s"] / pre["median_s"]
        floor = res.get("gemm_floor")
        if floor and not floor.get("failed"):
            s["ours_over_gemm_floor"] = ours["median_s"] / floor["median_s"]
        summary[mask] = s
        print(f"summary mask={mask}: " + ", ".join(f"{k}={v:.3f}" for k, v in s.items()))

    long_results = []
    for t in [int(x) for x in args.long.split(",") if x]:
        exact = run_variant("fp64_ref", 1, t, "full", args, 1).get("loss")
        for v in [v for v in args.long_variants.split(",") if v]:
            r = run_variant(v, 1, t, "full", args, args.long_repeats)
            if exact is not None and not r.get("failed"):
                r["loss_rel_err_vs_fp64"] = abs(r["loss"] - exact) / abs(exact)
            long_results.append(r)
            print(f"long T={t:5d}" + fmt(r), flush=True)

    record = {"machine": f"{os.cpu_count()}-core CPU ({platform.machine()})", "threads": args.threads,
              "torch_threads": args.threads, "dtype": "float32",
              "shape": {"B": args.B, "T": args.T, "H": args.H, "V": args.V}, "beta": BETA, "nll_alpha": NLL_ALPHA,
              "chunk_size": args.chunk, "main": main_results, "summary": summary, "long": long_results,
              "load_avg_at_end": os.getloadavg()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    plot(record, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
