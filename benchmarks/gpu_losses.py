"""GPU benchmark of the fused linear-head losses: ours (each Triton strategy) vs the usual baselines.

For each loss (CE, online-proxy KD, offline top-10 KD, DPO + NLL) it times forward + backward
with CUDA events, measures the peak memory beyond inputs and gradients, and reports effective
TFLOP/s (2*N*H*V per GEMM, N = all token positions: 3 GEMMs for CE, offline KD and DPO, 4 for
online KD) for:
  ours: triton (default), triton-chunked, triton-fused, torch (our chunked torch backend);
  baselines: naive torch (full logits), torch.compile of it, Liger, cut-cross-entropy (CE).
Like for like: every implementation computes the same loss. Online KD is NLL + alpha * forward
KL with alpha = 1, T = 1, against LigerFusedLinearJSDLoss(beta=0 (forward KL), temperature=1,
weight_hard_loss=1, weight_soft_loss=1); Liger is skipped at other settings. DPO is
sigmoid DPO, beta = 0.1, with precomputed ref_logps plus nll_alpha = 1 times the chosen NLL, on
2B rows of T tokens (B chosen rows, then B rejected); Liger's DPO takes no precomputed ref_logps
and is not run.

Correctness first: each of ours is checked against an fp64 reference (loss and gradients) on a
small shape (DPO: on a slice of the benchmark batch, against a naive fp64 torch DPO), and every
implementation's loss is checked against naive torch at the benchmark shape (computed in row
slices so it cannot run out of memory). A failed check is reported as FAILED with no timing.
Any other failure of one implementation (OOM or an exception) is recorded and the rest still
run; the JSON under benchmarks/results/ is rewritten after every implementation.

Memory: peak allocated during one fwd+bwd minus the inputs and the returned gradients, both
including and excluding our fp32 dW accumulator (4*V*H bytes; the losses promise fp32 gradient
accumulation, so it is the gradient, held in fp32). The memory targets are compared with
the figure excluding it; the table shows both.

    python benchmarks/gpu_losses.py                 # N=16384, H=4096, V=128256, bf16
    python benchmarks/gpu_losses.py --shape small   # quick check
    python benchmarks/gpu_losses.py --only triton-chunked,liger --cases ce --chunk-size 4096
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
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"full": (16384, 4096, 128256), "small": (2048, 1024, 32768)}
CHECK_SHAPE = (384, 256, 4099)  # small, odd vocab: fp64 reference check of loss and gradients
OURS = ("triton", "triton-chunked", "triton-fused", "torch")
BASELINES = ("naive", "compiled", "liger", "cce")
GEMMS = {"ce": 3, "kd_online": 4, "kd_offline": 3, "dpo": 3}
ALPHA, TOPK = 1.0, 10
DPO_BETA, DPO_NLL_ALPHA, DPO_REF_SPREAD = 0.1, 1.0, 5.0
# The GPU targets: effective TFLOP/s, and peak extra GB (1e9 B, excluding the fp32 dW).
TFLOPS_TARGETS = {"ce": 650.0, "kd_offline": 650.0, "kd_online": 600.0, "dpo": 600.0}
MEMORY_TARGETS_GB = {"triton": 2.5, "triton-chunked": 2.5, "triton-fused": 0.3}
LIGER_SPEEDUP_TARGET = 1.5
LOSS_RTOL = 2e-3
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
    inputs["ref_offsets"] = DPO_REF_SPREAD * torch.randn(n, device=DEVICE, generator=g)  # first 2B used
    from proxykd_fast.losses import linear_topk

    ids, lps = linear_topk(inputs["proxy_hidden"], inputs["proxy_weight"], TOPK, backend="torch")
    inputs["topk_ids"], inputs["topk_logprobs"] = ids, lps
    return inputs


# ---- DPO: token log-probs -> sigmoid DPO + chosen NLL -------------------------------------------


def dpo_rows(n: int, seq: int) -> tuple[int, int]:
    """(2B, T) for DPO over n token positions: rows of `seq` tokens (fewer if n is small), an even count."""
    t = min(seq, n // 2)
    if t < 1 or n % (2 * t):
        raise ValueError(f"DPO needs N = 2B*T; N={n} is not a multiple of 2*T={2 * t}")
    return n // t, t


def naive_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(h W^T)[y] per token over full logits (fp32, or fp64 for fp64 inputs), 0 at ignored."""
    z = F.linear(hidden, weight)
    z = z.float() if z.dtype != torch.float64 else z
    valid = labels != -100
    lp = torch.log_softmax(z, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return lp * valid


def dpo_objective(tok: torch.Tensor, valid: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """mean_b -logsigmoid(beta h_b) + nll_alpha * chosen NLL from [2B, T] token log-probs (the documented formula)."""
    b = tok.shape[0] // 2
    sums = tok.sum(1)
    margin = (sums[:b] - ref[:b]) - (sums[b:] - ref[b:])
    nll = -tok[:b].sum() / valid[:b].sum().clamp(min=1)
    return -F.logsigmoid(DPO_BETA * margin).mean() + DPO_NLL_ALPHA * nll


def naive_dpo(x: dict) -> torch.Tensor:
    """Plain torch DPO + NLL with the full [N, V] logits."""
    rows, t = x["dpo_shape"]
    tok = naive_token_logps(x["hidden"], x["weight"], x["labels"]).view(rows, t)
    return dpo_objective(tok, (x["labels"] != -100).view(rows, t), x["ref_logps"])


@torch.no_grad()
def naive_seq_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int,
                    slice_rows: int = 2048) -> torch.Tensor:
    """Per-row sums of naive token log-probs, over token slices (bounded memory)."""
    tok = torch.cat([naive_token_logps(hidden[i:i + slice_rows], weight, labels[i:i + slice_rows])
                     for i in range(0, hidden.shape[0], slice_rows)])
    return tok.view(rows, -1).sum(1)


def add_dpo_inputs(x: dict, seq: int) -> None:
    """Shape (2B, T) and precomputed reference log-probs: the policy's own plus a per-row offset, so the
    DPO margins are O(1) (sigmoid neither flat nor saturated) as after a few steps of training."""
    rows, t = dpo_rows(x["hidden"].shape[0], seq)
    x["dpo_shape"] = (rows, t)
    x["ref_logps"] = (naive_seq_logps(x["hidden"].detach(), x["weight"].detach(), x["labels"], rows)
                      + x["ref_offsets"][:rows]).float()


# ---- the losses -------------------------------------------------------------------------------


def ours(case: str, backend: str, x: dict, args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    """Closure computing our loss for `case` with `backend` (leaves: x['hidden'], x['weight'])."""
    from proxykd_fast.losses import dpo_loss, linear_cross_entropy, proxy_kd_loss

    kw = {"chunk_size": args.chunk_size, "backend": backend}
    if case == "ce":
        return lambda: linear_cross_entropy(x["hidden"], x["weight"], x["labels"], **kw)
    if case == "kd_online":
        return lambda: proxy_kd_loss(x["hidden"], x["weight"], x["labels"], proxy_hidden=x["proxy_hidden"],
                                     proxy_weight=x["proxy_weight"], alpha=ALPHA, temperature=args.temperature,
                                     divergence=args.divergence, **kw)
    if case == "dpo":
        rows, t = x["dpo_shape"]
        return lambda: dpo_loss(x["hidden"].view(rows, t, -1), x["weight"], x["labels"].view(rows, t),
                                ref_logps=x["ref_logps"], beta=DPO_BETA, loss_type="sigmoid",
                                nll_alpha=DPO_NLL_ALPHA, **kw)[0]
    return lambda: proxy_kd_loss(x["hidden"], x["weight"], x["labels"], proxy_topk_ids=x["topk_ids"],
                                 proxy_topk_logprobs=x["topk_logprobs"], alpha=ALPHA, temperature=args.temperature,
                                 **kw)


def naive_loss(case: str, x: dict, divergence: str, temperature: float) -> torch.Tensor:
    """Plain torch with the full [N, V] fp32 logits, the way a training script writes it."""
    if case == "dpo":
        return naive_dpo(x)
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
    if case == "dpo":
        n_rows, t = x["dpo_shape"]
        tok = torch.cat([naive_token_logps(x["hidden"][i:i + rows], x["weight"], x["labels"][i:i + rows])
                         for i in range(0, x["hidden"].shape[0], rows)]).view(n_rows, t)
        return float(dpo_objective(tok, (x["labels"] != -100).view(n_rows, t), x["ref_logps"]))
    total, n_valid = 0.0, int((x["labels"] != -100).sum())
    for start in range(0, x["labels"].shape[0], rows):
        part = {k: (v[start:start + rows] if k not in ("weight", "proxy_weight") else v) for k, v in x.items()
                if isinstance(v, torch.Tensor)}
        valid = int((part["labels"] != -100).sum())
        total += float(naive_loss(case, part, divergence, temperature)) * max(valid, 1)
    return total / max(n_valid, 1)


_COMPILED: dict = {}


def baseline(name: str, case: str, x: dict, args: argparse.Namespace) -> Callable[[], torch.Tensor] | str:
    """Closure for a baseline, or a string saying why it does not apply / is not installed."""
    divergence, temperature = args.divergence, args.temperature
    if name == "naive":
        return lambda: naive_loss(case, x, divergence, temperature)
    if name == "compiled":
        key = (case, divergence, temperature)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(lambda inp: naive_loss(case, inp, divergence, temperature))
        fn = _COMPILED[key]
        return lambda: fn(x)
    if name == "liger":
        return _liger(case, x, divergence, temperature)
    if case != "ce":
        return "CE only"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        return "not installed"
    return lambda: cce(x["hidden"], x["weight"], x["labels"])


def _liger(case: str, x: dict, divergence: str, temperature: float) -> Callable[[], torch.Tensor] | str:
    """Liger's like-for-like loss for `case`, or why there is none."""
    if case == "kd_offline":
        return "no offline top-k loss"
    if case == "dpo":
        return "LigerFusedLinearDPOLoss takes no precomputed ref_logps (online reference only): not like for like"
    if case == "kd_online" and (divergence != "forward_kl" or temperature != 1.0 or ALPHA != 1.0):
        return "compared only at forward_kl, T=1, alpha=1 (LigerFusedLinearJSDLoss beta=0), like for like"
    try:
        if case == "ce":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            mod = LigerFusedLinearCrossEntropyLoss()
            return lambda: mod(x["weight"], x["hidden"], x["labels"])
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return "not installed"
    # beta=0 is KL(teacher || student), Liger's forward KL; hard and soft losses are each / valid tokens.
    mod = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0)
    return lambda: mod(x["hidden"], x["weight"], x["proxy_hidden"], x["proxy_weight"], x["labels"])


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


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in fp64."""
    return float((a.double() - b.double()).abs().max()) / max(float(b.double().abs().max()), 1e-6)


def _grad_tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 2e-2


def check_small(case: str, backend: str, args: argparse.Namespace) -> str:
    """'' if our backend matches the fp64 reference on CHECK_SHAPE (loss and grads), else why not."""
    x = make_inputs(*CHECK_SHAPE, args.dtype, seed=1)
    for t in _leaves(x):
        t.requires_grad_()
    loss = fwd_bwd(ours(case, backend, x, args), x)
    got = [loss.double()] + [t.grad.double() for t in _leaves(x)]
    ref_x = {k: (v.detach().double() if v.is_floating_point() and k != "topk_logprobs" else v) for k, v in x.items()}
    for t in _leaves(ref_x):
        t.requires_grad_()
    ref_loss = fwd_bwd(ours(case, "reference", ref_x, args), ref_x)
    ref = [ref_loss] + [t.grad for t in _leaves(ref_x)]
    tol = _grad_tol(args.dtype)
    for name, a, b in zip(("loss", "d_hidden", "d_weight"), got, ref):
        err = _max_rel(a, b)
        if not err <= tol:
            return f"{name} off the fp64 reference by {err:.1e} (tol {tol})"
    return ""


def check_dpo_slice(backend: str, x: dict, args: argparse.Namespace, tokens: int = 512) -> str:
    """'' if our DPO matches a naive fp64 torch DPO (loss, d_hidden, d_weight) on a slice of the batch.

    The slice: the first `tokens` positions of two chosen rows and their rejected rows, at the real
    H and V; its reference log-probs are the fp64 policy's plus the benchmark's per-row offsets.
    """
    from proxykd_fast.losses import dpo_loss

    rows, t = x["dpo_shape"]
    b = rows // 2
    pick = [0, 1, b, b + 1] if b >= 2 else [0, b]
    tt = min(t, tokens)
    hs = x["hidden"].detach().view(rows, t, -1)[pick, :tt].contiguous()
    lab = x["labels"].view(rows, t)[pick, :tt].contiguous()
    w = x["weight"].detach()
    h64 = hs.double().requires_grad_()
    w64 = w.double().requires_grad_()
    tok = naive_token_logps(h64.view(-1, h64.shape[-1]), w64, lab.view(-1)).view(len(pick), tt)
    ref = tok.detach().sum(1) + x["ref_offsets"][pick].double()
    ref_loss = dpo_objective(tok, lab != -100, ref)
    ref_loss.backward()
    h = hs.clone().requires_grad_()
    w_ = w.clone().requires_grad_()
    loss = dpo_loss(h, w_, lab, ref_logps=ref.float(), beta=DPO_BETA, loss_type="sigmoid", nll_alpha=DPO_NLL_ALPHA,
                    chunk_size=args.chunk_size, backend=backend)[0]
    loss.backward()
    tol = _grad_tol(args.dtype)
    for name, a, r in (("loss", loss.detach(), ref_loss.detach()), ("d_hidden", h.grad, h64.grad),
                       ("d_weight", w_.grad, w64.grad)):
        err = _max_rel(a, r)
        if not err <= tol:
            return f"{name} off the naive fp64 DPO on a {len(pick)}x{tt}-token slice by {err:.1e} (tol {tol})"
    return ""


def _free(x: dict) -> None:
    for t in _leaves(x):
        t.grad = None
    gc.collect()
    torch.cuda.empty_cache()


def measure(row: dict, name: str, case: str, args: argparse.Namespace, x: dict, ref_loss: float | None,
            flops: float, fp32_dw_bytes: int) -> None:
    """Check, then time and measure one implementation into `row` (exceptions propagate)."""
    if name in OURS:
        why = check_dpo_slice(name, x, args) if case == "dpo" else check_small(case, name, args)
        if why:
            row["status"] = f"FAILED correctness: {why}"
            return
        fn = ours(case, name, x, args)
    else:
        fn = baseline(name, case, x, args)
        if isinstance(fn, str):
            row["status"] = f"skipped: {fn}"
            return
    loss = float(fwd_bwd(fn, x))
    row["loss"] = loss
    if ref_loss is None or not abs(loss - ref_loss) <= LOSS_RTOL * max(1.0, abs(ref_loss)):
        row["status"] = f"FAILED correctness: loss {loss:.6f} vs naive {ref_loss}"
        return
    row["ms"] = time_ms(fn, x, args.warmup, args.iters)
    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
    peak = peak_extra_bytes(fn, x)
    held = fp32_dw_bytes if name in OURS else 0
    row["peak_extra_gb_incl_fp32_dw"] = peak / 1e9
    row["peak_extra_gb"] = (peak - held) / 1e9
    row["fp32_dw_gb"] = held / 1e9


def run_case(case: str, args: argparse.Namespace, x: dict, n: int, h: int, v: int,
             save: Callable[[], None], results: list[dict]) -> list[dict]:
    """Check, time and measure every selected implementation of one loss; save after each."""
    names = [name for name in (*OURS, *BASELINES) if not args.only or name in args.only]
    flops = GEMMS[case] * 2.0 * n * h * v
    rows: list[dict] = []
    try:
        if case == "dpo":
            add_dpo_inputs(x, args.dpo_seq)
        ref_loss, ref_error = naive_reference(case, x, args.divergence, args.temperature), ""
    except Exception as exc:  # no reference: nothing can pass its loss check
        ref_loss, ref_error = None, f"{type(exc).__name__}: {exc}"
    for name in names:
        row = {"case": case, "impl": name, "status": "ok"}
        if case == "dpo":
            row["dpo_rows_x_tokens"] = list(x.get("dpo_shape", ()))
            if name == "triton-fused":
                row["note"] = "tile-fused linear_log_probs path: its backward recomputes the logits tiles"
        if name == "triton-fused" and case == "kd_online":
            row["note"] = "online proxy runs on the chunked epilogue"
        rows.append(row)
        results.append(row)
        try:
            if ref_loss is None:
                row["status"] = f"FAILED correctness: naive reference failed ({ref_error})"
            else:
                measure(row, name, case, args, x, ref_loss, flops, 4 * v * h)
        except torch.OutOfMemoryError:
            row["status"] = "OOM"
        except Exception as exc:  # record it, run the others
            row["status"] = f"ERROR: {type(exc).__name__}: {str(exc)[:300]}"
            row["traceback"] = traceback.format_exc(limit=8)
        finally:
            for key in ("ms", "tflops", "peak_extra_gb", "peak_extra_gb_incl_fp32_dw", "fp32_dw_gb"):
                if row["status"] != "ok":
                    row.pop(key, None)  # never a speed for a run that did not pass
            _free(x)
            save()
    return rows


def print_table(rows: list[dict]) -> None:
    """Side-by-side table of one case."""
    print(f"\n{rows[0]['case']}:")
    print(f"  {'impl':<16}{'ms':>10}{'TFLOP/s':>10}{'GB excl.dW32':>14}{'GB incl.dW32':>14}{'loss':>12}  status")
    for r in rows:
        ms = f"{r['ms']:.2f}" if "ms" in r else "-"
        tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
        mem = f"{r['peak_extra_gb']:.2f}" if "peak_extra_gb" in r else "-"
        mem_all = f"{r['peak_extra_gb_incl_fp32_dw']:.2f}" if "peak_extra_gb_incl_fp32_dw" in r else "-"
        loss = f"{r['loss']:.5f}" if "loss" in r else "-"
        note = f" ({r['note']})" if "note" in r else ""
        print(f"  {r['impl']:<16}{ms:>10}{tf:>10}{mem:>14}{mem_all:>14}{loss:>12}  {r['status']}{note}")


def target_lines(results: list[dict], full_shape: bool) -> list[str]:
    """The GPU targets against this run's figures (memory: excluding the fp32 dW accumulator)."""
    by = {(r["case"], r["impl"]): r for r in results}
    out = ["memory targets are compared with the peak EXCLUDING our fp32 dW accumulator (column 'GB excl.dW32')"]
    if not full_shape:
        out.append("(targets are set for --shape full; this run is not at that shape)")
    for case, target in TFLOPS_TARGETS.items():
        for impl in ("triton", "triton-chunked", "triton-fused"):
            r = by.get((case, impl))
            if r is None:
                continue
            if "tflops" not in r:
                out.append(f"{case:<11}{impl:<16}not measured: {r['status']}")
                continue
            mem_t = MEMORY_TARGETS_GB[impl]
            # the memory targets: CE and KD; the tile-fused form has no online-proxy variant
            has_mem = case != "dpo" and not (impl == "triton-fused" and case == "kd_online")
            mem = "" if not has_mem else (f", {r['peak_extra_gb']:.2f} GB vs <= {mem_t} GB: "
                                          f"{'met' if r['peak_extra_gb'] <= mem_t else 'MISSED'}")
            out.append(f"{case:<11}{impl:<16}{r['tflops']:.0f} TFLOP/s vs >= {target:.0f}: "
                       f"{'met' if r['tflops'] >= target else 'MISSED'}{mem}")
    ours_r, liger = by.get(("kd_online", "triton")), by.get(("kd_online", "liger"))
    if ours_r and liger and "ms" in ours_r and "ms" in liger:
        speedup = liger["ms"] / ours_r["ms"]
        less = ours_r["peak_extra_gb_incl_fp32_dw"] < liger["peak_extra_gb_incl_fp32_dw"]
        out.append(f"kd_online  triton vs liger: {speedup:.2f}x (>= {LIGER_SPEEDUP_TARGET}x: "
                   f"{'met' if speedup >= LIGER_SPEEDUP_TARGET else 'MISSED'}), memory incl. fp32 dW "
                   f"{ours_r['peak_extra_gb_incl_fp32_dw']:.2f} vs {liger['peak_extra_gb_incl_fp32_dw']:.2f} GB "
                   f"({'less' if less else 'NOT less'})")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="full")
    parser.add_argument("--cases", default="ce,kd_online,kd_offline,dpo", help="comma list of " + ",".join(GEMMS))
    parser.add_argument("--only", default="", help="comma list of implementations: " + ",".join(OURS + BASELINES))
    parser.add_argument("--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="rows (tokens) per logits chunk for our losses (default: the backend's choice)")
    parser.add_argument("--dpo-seq", type=int, default=2048, help="DPO tokens per row T (2B = N / T rows)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default="", help="JSON path (default: benchmarks/results/gpu_losses_<device>_<time>.json)")
    args = parser.parse_args(argv)
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.only = [s for s in args.only.split(",") if s]
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in GEMMS] + [s for s in args.only if s not in OURS + BASELINES]
    if unknown:
        parser.error(f"unknown case or implementation: {unknown}")
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error("--chunk-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Parse options, run every case, print and save the results (the JSON after every implementation)."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_losses.py needs a CUDA GPU (written for H100/H200); none is visible, nothing was measured.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter would run the kernels on the CPU.")
    import triton

    n, h, v = SHAPES[args.shape]
    device = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / (
        f"gpu_losses_{device.replace(' ', '_')}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "shape": [n, h, v],
            "dtype": str(args.dtype), "divergence": args.divergence, "temperature": args.temperature,
            "chunk_size": args.chunk_size, "topk": TOPK, "alpha": ALPHA, "flops_per_gemm": 2 * n * h * v,
            "gemms": GEMMS, "dpo": {"beta": DPO_BETA, "nll_alpha": DPO_NLL_ALPHA, "loss_type": "sigmoid",
                                    "tokens_per_row": args.dpo_seq, "ref": "precomputed ref_logps"},
            "memory": "peak allocated beyond inputs and returned grads, GB = 1e9 B; 'peak_extra_gb' excludes "
                      "our fp32 dW accumulator (4*V*H B), the figure the memory targets are compared with"}
    results: list[dict] = []

    def save(complete: bool = False) -> None:
        out.write_text(json.dumps({"meta": meta, "complete": complete, "results": results}, indent=2))

    print(f"{device}: N={n} H={h} V={v} {args.dtype}, divergence={args.divergence}, T={args.temperature}, "
          f"chunk_size={args.chunk_size}; writing {out}")
    x = make_inputs(n, h, v, args.dtype)
    for t in _leaves(x):
        t.requires_grad_()
    for case in args.cases:
        print_table(run_case(case, args, x, n, h, v, save, results))
    save(complete=True)
    print("\ntargets:")
    for line in target_lines(results, args.shape == "full"):
        print("  " + line)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
