"""An FSDP2-sharded lm_head under a fused loss: gather the head (A) or go vocab-parallel on gathered tokens (B).

Under FSDP2 every rank holds its own tokens and a dim-0 shard of `lm_head.weight`; that local shard
(`DTensor.to_local()`) is a contiguous block of vocabulary rows in rank order, torch.chunk sizes
(ceil(V / world) rows, the last ranks fewer, unpadded), i.e. a valid `vocab_parallel_group` shard.
Two ways to feed it to a fused loss, both timed here on `--world` gloo CPU processes:

  gather          (A) pass the DTensor: the loss all-gathers the head once per call in the compute dtype
                  and reduce-scatters its gradient (proxykd_fast.losses._vocab_parallel.gather_dtensor).
                  Sends about 2 (w-1)/w V H b bytes per rank and step (b: bytes of the compute dtype) and
                  holds the full head and its fp32 gradient.
  vocab_parallel  (B) all-gather every rank's hidden states, labels (and top-k targets) and pass the local
                  shard with `vocab_parallel_group`: per token only row statistics are all-reduced, plus
                  the hidden gradient once (fp32); each rank takes back its own rows (no communication in
                  that backward). Sends about (w-1) N H (b + 8) bytes per rank (N tokens per rank) and
                  holds every rank's hidden states and their fp32 gradient.

Both optimise the FSDP / DDP objective: the mean loss over every rank's valid tokens (A: each rank's sum
over `num_items_in_batch` = global count / world, as Hugging Face's Trainer does; B: the mean over the
gathered batch), the head gradient averaged over ranks, and each rank's hidden gradient that of its own
share (FSDP2 then averages the backbone's gradients). One step of each path is first checked at the
measured shape against a single-process fp64 computation (the loss, every rank's hidden gradient, the
head gradient). Then forward + backward is timed in interleaved rounds (the order alternates; per round
the slowest rank counts; median and min over --repeats), with the resident peak above the pre-step
baseline per rank (benchmarks/_cpu_measure.py's convention: fixed malloc thresholds, the loss's
workspace released before the baseline). The bytes each rank sends per step are given from the shapes
(ring collectives) and counted from the collectives the step actually issued.

    python -m benchmarks.fsdp_head --json benchmarks/results/fsdp_head.json   # N=2048/rank H=1024 V=32000
    python -m benchmarks.fsdp_head --n 64 --h 32 --v 1000 --repeats 2          # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks._cpu_measure import MALLOC_ENV, peak_mb, reset_peak, rss_mb

LOSSES = ("ce", "kd")
PATHS = ("gather", "vocab_parallel")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # max |error| / max |fp64 value|, for the loss and each gradient
IGNORE = -100
ALPHA = 0.5  # offline top-k KD weight beside the NLL
REF_ROWS = 512  # rows per chunk of the fp64 reference


@dataclasses.dataclass(frozen=True)
class Config:
    """One measurement: N tokens on each of `world` ranks, a [V, H] head, the compute dtype."""

    n: int = 2048
    h: int = 1024
    v: int = 32000
    world: int = 2
    dtype: str = "fp32"
    repeats: int = 5
    warmup: int = 1
    losses: tuple[str, ...] = LOSSES
    topk: int = 8
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("n", "h", "v", "repeats", "topk", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.world, int) or self.world < 2:
            raise ValueError(f"world must be an integer >= 2, got {self.world!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")
        if math.ceil(self.v / math.ceil(self.v / self.world)) < self.world:
            raise ValueError(f"v={self.v} leaves a rank of world={self.world} without vocabulary rows under "
                             "FSDP2's ceil(V / world) shards (vocab-parallel needs >= 1 row per rank)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not self.losses or any(k not in LOSSES for k in self.losses):
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {self.losses!r}")
        if self.topk > self.v:
            raise ValueError(f"topk must be <= v, got topk={self.topk} v={self.v}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# ----------------------------------------------------------------------------- inputs


def head_weight(cfg: Config) -> Tensor:
    """The full [V, H] fp32 head (the FSDP2 master), the same on every rank; logits of std ~1.5."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(cfg.v, cfg.h, generator=g) * (1.5 / math.sqrt(cfg.h))


def rank_tokens(cfg: Config, rank: int) -> dict[str, Tensor]:
    """This rank's own tokens: hidden states (compute dtype), labels (a rank-long prompt and a last token
    ignored, so valid counts differ across ranks) and distinct top-k proxy targets (unnormalised)."""
    g = torch.Generator().manual_seed(1 + rank)
    hidden = torch.randn(cfg.n, cfg.h, generator=g).to(cfg.torch_dtype)
    labels = torch.randint(0, cfg.v, (cfg.n,), generator=g)
    labels[: min(rank + 1, cfg.n - 1)] = IGNORE
    if cfg.n > 2:
        labels[-1] = IGNORE
    base = torch.randint(0, cfg.v, (cfg.n, 1), generator=g)
    ids = (base + torch.arange(cfg.topk) * (cfg.v // cfg.topk)) % cfg.v
    lps = torch.log_softmax(torch.randn(cfg.n, cfg.topk, generator=g) * 2.0, -1) - 0.3
    return {"hidden": hidden, "labels": labels, "topk_ids": ids, "topk_logprobs": lps}


# ----------------------------------------------------------------------------- the two paths


class GatherTokens(torch.autograd.Function):
    """All-gather every rank's rows of x (same row count on every rank), in rank order.

    The vocab-parallel loss gives every rank the full, already all-reduced hidden gradient, so the
    backward needs no communication: this rank's rows, times world, i.e. the gradient of this rank's
    share of the mean loss, which FSDP2 then averages like every other gradient (as under the gather path).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: object) -> Tensor:
        ctx.world, ctx.rank, ctx.rows = dist.get_world_size(group), dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows] * ctx.world, None


def _gathered(t: Tensor, group: object) -> Tensor:
    """Every rank's copy of a tensor without gradient, concatenated in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def fused_loss(kind: str, hidden: Tensor, weight: Tensor, tok: dict[str, Tensor],
               num_items: float | None = None, group: object = None) -> Tensor:
    """CE, or NLL + ALPHA * offline top-k forward KL, through proxykd_fast's fused losses."""
    from proxykd_fast.losses import linear_cross_entropy, proxy_kd_loss

    vp = {} if group is None else {"vocab_parallel_group": group}
    if kind == "ce":
        return linear_cross_entropy(hidden, weight, tok["labels"], num_items_in_batch=num_items, **vp)
    return proxy_kd_loss(hidden, weight, tok["labels"], proxy_topk_ids=tok["topk_ids"],
                         proxy_topk_logprobs=tok["topk_logprobs"], alpha=ALPHA, num_items_in_batch=num_items, **vp)


def path_loss(path: str, kind: str, head: torch.nn.Module, hidden: Tensor, tok: dict[str, Tensor],
              num_items: float, dtype: torch.dtype) -> Tensor:
    """One rank's loss through path A (`gather`: the DTensor head) or B (`vocab_parallel`)."""
    if path == "gather":
        return fused_loss(kind, hidden, head.weight, tok, num_items)
    group = dist.group.WORLD
    needed = ("labels",) if kind == "ce" else ("labels", "topk_ids", "topk_logprobs")
    everyone = {k: _gathered(tok[k], group) for k in needed}
    return fused_loss(kind, GatherTokens.apply(hidden, group), head.weight.to_local().to(dtype), everyone,
                      None, group)


# ----------------------------------------------------------------------------- bytes on the wire


def _nbytes(ts: object) -> int:
    """Total bytes of a tensor or a (nested) list of tensors."""
    if isinstance(ts, Tensor):
        return ts.numel() * ts.element_size()
    return sum(_nbytes(t) for t in ts)


# op -> (argument holding the payload, the share of it a rank sends under a ring algorithm, as f(world))
_RING: dict[str, tuple[int, Callable[[int], float]]] = {
    "_c10d_functional::all_gather_into_tensor": (0, lambda w: w - 1),
    "_c10d_functional::reduce_scatter_tensor": (0, lambda w: (w - 1) / w),
    "_c10d_functional::all_reduce": (0, lambda w: 2 * (w - 1) / w),
    "c10d::allreduce_": (0, lambda w: 2 * (w - 1) / w),
    "c10d::allgather_": (1, lambda w: w - 1),
    "c10d::_allgather_base_": (1, lambda w: w - 1),
    "c10d::reduce_scatter_": (1, lambda w: (w - 1) / w),
    "c10d::_reduce_scatter_base_": (1, lambda w: (w - 1) / w),
}
_NOT_COLLECTIVES = {"_c10d_functional::wait_tensor", "_c10d_functional::_wrap_tensor_autograd", "c10d::barrier"}


class CollectiveBytes(TorchDispatchMode):
    """Counts the bytes this rank sends in every collective issued under it (forward and backward)."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world
        self.sent: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.uncounted: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith(("c10d::", "_c10d_functional::")) and name not in _NOT_COLLECTIVES:
            short = name.split("::")[1]
            if name in _RING:
                arg, share = _RING[name]
                self.sent[short] += round(_nbytes(args[arg]) * share(self.world))
                self.calls[short] += 1
            else:
                self.uncounted[short] += 1
        return func(*args, **(kwargs or {}))


def analytic_bytes(cfg: Config, kind: str, path: str) -> dict[str, int]:
    """Bytes one rank sends per step from the shapes alone (ring collectives), by what is sent."""
    w, n, h, b, k = cfg.world, cfg.n, cfg.h, cfg.torch_dtype.itemsize, cfg.topk
    if path == "gather":
        rows = math.ceil(cfg.v / w)  # FSDP2 pads every shard to ceil(V / world) rows for its collectives
        return {"all-gather W": (w - 1) * rows * h * b, "reduce-scatter dW": (w - 1) * rows * h * b}
    # fp32 per token: row max, sum-exp and the label logit, and for offline KD at T=1 the k target logits.
    # Counted over all N tokens: the loss skips ignored rows, so the counted figure is a little lower.
    stats = 12 if kind == "ce" else 12 + 4 * k
    out = {"all-gather hidden": (w - 1) * n * h * b, "all-gather labels": (w - 1) * n * 8,
           "all-reduce row stats": 2 * (w - 1) * n * stats, "all-reduce dX (fp32)": 2 * (w - 1) * n * h * 4,
           # the shard sizes (one int64 per rank), and the same-on-every-rank probes of hidden and labels
           "shard sizes + input probes": (w - 1) * 8 + round(2 * (w - 1) / w * 4 * 16)}
    if kind == "kd":
        out["all-gather top-k"] = (w - 1) * n * k * (8 + 4)
    return out


# ----------------------------------------------------------------------------- per rank


def _worker(rank: int, cfg: Config, out_dir: str) -> None:
    torch.set_num_threads(cfg.threads)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rdzv", rank=rank, world_size=cfg.world)
    try:
        _measure_rank(rank, cfg, Path(out_dir))
    finally:
        dist.destroy_process_group()


def _measure_rank(rank: int, cfg: Config, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from tqdm import tqdm

    from proxykd_fast.losses import release_workspace

    head = torch.nn.Linear(cfg.h, cfg.v, bias=False)
    with torch.no_grad():
        head.weight.copy_(head_weight(cfg))
    fully_shard(head)  # head.weight: a DTensor, Shard(0); its forward never runs (the fused loss reads it)
    tok = rank_tokens(cfg, rank)
    hidden = tok["hidden"].requires_grad_()
    valid = torch.tensor(float((tok["labels"] != IGNORE).sum()))
    dist.all_reduce(valid)
    num_items = float(valid) / cfg.world  # Trainer's convention: global count / world, FSDP averages ranks

    def reset() -> None:
        hidden.grad, head.weight.grad = None, None

    def step(path: str, kind: str) -> Tensor:
        loss = path_loss(path, kind, head, hidden, tok, num_items, cfg.torch_dtype)
        loss.backward()
        return loss.detach()

    record: dict[str, dict] = {"shard_rows": head.weight.to_local().shape[0]}
    saved: dict[str, Tensor] = {}
    bar = tqdm(total=len(cfg.losses) * (len(PATHS) * (1 + cfg.warmup) + 2 * cfg.repeats), desc="fsdp_head steps",
               disable=rank != 0, file=sys.stderr)
    for kind in cfg.losses:
        for path in PATHS:  # the check step: gradients against fp64 later, and the collectives counted
            reset()
            with CollectiveBytes(cfg.world) as counter:
                loss = step(path, kind)
            saved[f"{kind}/{path}/loss"] = loss.double()
            saved[f"{kind}/{path}/dx"] = hidden.grad.detach().clone()
            saved[f"{kind}/{path}/dw"] = head.weight.grad.to_local().detach().clone()
            record[f"{kind}/{path}"] = {"sent": dict(counter.sent), "calls": dict(counter.calls),
                                        "uncounted": dict(counter.uncounted), "times_s": [], "peaks_mb": []}
            bar.update()
            for _ in range(cfg.warmup):
                reset()
                step(path, kind)
                bar.update()
        for r in range(cfg.repeats):
            for path in PATHS if r % 2 == 0 else PATHS[::-1]:  # alternate so neither always runs second
                reset()
                gc.collect()
                release_workspace()  # the loss's cached workspace counts against the step
                dist.barrier()
                base = rss_mb()
                if not reset_peak():
                    raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs: no peak-memory figure")
                t0 = time.perf_counter()
                step(path, kind)
                dt = time.perf_counter() - t0
                rec = record[f"{kind}/{path}"]
                rec["times_s"].append(dt)
                rec["peaks_mb"].append(peak_mb() - base)
                bar.update()
    bar.close()
    reset()
    torch.save(saved, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(record))


@contextlib.contextmanager
def _malloc_env() -> Iterator[None]:
    """MALLOC_ENV in the environment the spawned ranks start with (glibc reads it at start), restored after."""
    saved = {k: os.environ.get(k) for k in MALLOC_ENV}
    os.environ.update(MALLOC_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- the fp64 reference


def reference(cfg: Config, kind: str) -> dict[str, Tensor]:
    """Single-process fp64: the mean loss over every rank's valid tokens, d/dW, and each rank's hidden
    gradient as FSDP hands it to that rank (world x d/dX: its share, before FSDP2's averaging)."""
    from proxykd_fast.losses import proxy_kd_loss

    w = head_weight(cfg).to(cfg.torch_dtype).double().requires_grad_()
    toks = [rank_tokens(cfg, r) for r in range(cfg.world)]
    x = torch.cat([t["hidden"] for t in toks]).double().requires_grad_()
    cat = {k: torch.cat([t[k] for t in toks]) for k in ("labels", "topk_ids", "topk_logprobs")}
    n_valid = int((cat["labels"] != IGNORE).sum())
    total = 0.0
    for s in range(0, x.shape[0], REF_ROWS):  # the summed loss is additive over rows: chunk to bound memory
        rows = slice(s, s + REF_ROWS)
        if kind == "ce":
            part = F.cross_entropy(x[rows] @ w.T, cat["labels"][rows], ignore_index=IGNORE, reduction="sum")
        else:
            part = proxy_kd_loss(x[rows], w, cat["labels"][rows], proxy_topk_ids=cat["topk_ids"][rows],
                                 proxy_topk_logprobs=cat["topk_logprobs"][rows].double(), alpha=ALPHA,
                                 reduction="sum", backend="reference")
        (part / n_valid).backward()
        total += part.item()
    return {"loss": torch.tensor(total / n_valid, dtype=torch.float64), "dx": x.grad * cfg.world, "dw": w.grad}


def _rel_err(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max(max |want|, tiny)."""
    return float((got.double() - want).abs().max()) / max(float(want.abs().max()), 1e-30)


# ----------------------------------------------------------------------------- the run


def run(cfg: Config) -> dict:
    """Spawn the ranks, check both paths against fp64, and return every figure (see the module doc)."""
    with tempfile.TemporaryDirectory(prefix="fsdp_head_") as tmp, _malloc_env():
        mp.spawn(_worker, args=(cfg, tmp), nprocs=cfg.world, join=True)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(cfg.world)]
        tensors = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(cfg.world)]
    results: dict[str, dict] = {}
    ref_losses: dict[str, float] = {}
    for kind in cfg.losses:
        ref = reference(cfg, kind)
        ref_losses[kind] = float(ref["loss"])
        results[kind] = {}
        for path in PATHS:
            key = f"{kind}/{path}"
            losses = torch.stack([t[f"{key}/loss"] for t in tensors])
            loss = losses.mean() if path == "gather" else losses[0]  # A: each rank's share; B: the same on all
            errors = {"loss": _rel_err(loss, ref["loss"]),
                      "hidden": _rel_err(torch.cat([t[f"{key}/dx"] for t in tensors]), ref["dx"]),
                      "weight": _rel_err(torch.cat([t[f"{key}/dw"] for t in tensors]), ref["dw"])}
            if path == "vocab_parallel":
                errors["ranks_disagree"] = float((losses - losses[0]).abs().max())
            per_round = [max(r[key]["times_s"][i] for r in ranks) for i in range(cfg.repeats)]
            peaks = [max(r[key]["peaks_mb"]) for r in ranks]
            counted = ranks[0][key]["sent"]
            analytic = analytic_bytes(cfg, kind, path)
            results[kind][path] = {
                "loss": float(loss), "errors": errors,
                "agree": all(errors[k] <= TOLERANCE[cfg.dtype] for k in ("loss", "hidden", "weight")),
                "time_s": statistics.median(per_round), "min_s": min(per_round), "times_s": per_round,
                "peak_above_baseline_mb": max(peaks), "peak_above_baseline_mb_per_rank": peaks,
                "sent_bytes_analytic": sum(analytic.values()), "sent_bytes_analytic_terms": analytic,
                "sent_bytes_counted": sum(counted.values()), "sent_bytes_counted_by_op": counted,
                "collective_calls": ranks[0][key]["calls"], "uncounted_collectives": ranks[0][key]["uncounted"],
            }
    return {"shape": dataclasses.asdict(cfg) | {"shard_rows": [r["shard_rows"] for r in ranks]},
            "machine": {"cpus": os.cpu_count(), "threads_per_rank": cfg.threads, "torch": torch.__version__,
                        "platform": platform.platform(), "processor": platform.processor()},
            "reference_loss": ref_losses,
            "results": results}


def table(res: dict) -> str:
    """The results as a text table, A beside B per loss."""
    s = res["shape"]
    head = (f"N={s['n']}/rank H={s['h']} V={s['v']} world={s['world']} {s['dtype']} top-k={s['topk']} "
            f"threads/rank={s['threads']} shards={s['shard_rows']} (median of {s['repeats']}, slowest rank)")
    lines = [head, f"{'loss':4} {'path':15} {'time s':>8} {'min s':>8} {'peak MB':>9} {'sent MB (shapes)':>17} "
             f"{'sent MB (counted)':>18} {'err loss/dX/dW':>26}"]
    for kind, paths in res["results"].items():
        for path, r in paths.items():
            e = r["errors"]
            lines.append(f"{kind:4} {path:15} {r['time_s']:8.3f} {r['min_s']:8.3f} {r['peak_above_baseline_mb']:9.1f} "
                         f"{r['sent_bytes_analytic'] / 1e6:17.2f} {r['sent_bytes_counted'] / 1e6:18.2f} "
                         f"{e['loss']:8.1e} {e['hidden']:8.1e} {e['weight']:8.1e}" + ("" if r["agree"] else "  MISMATCH"))
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Bars of time, peak memory and bytes sent per rank, A beside B for each loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(res["results"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    metrics = [("time_s", "step time (s)", 1.0), ("peak_above_baseline_mb", "peak RSS above baseline (MB)", 1.0),
               ("sent_bytes_counted", "sent per rank and step (MB)", 1e-6)]
    for ax, (key, label, scale) in zip(axes, metrics, strict=True):
        for j, p in enumerate(PATHS):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(kinds))]
            ax.bar(xs, [res["results"][k][p][key] * scale for k in kinds], width=0.38, label=p)
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8, loc="lower right")
    s = res["shape"]
    fig.suptitle(f"FSDP2 head: gather vs vocab-parallel, N={s['n']}/rank H={s['h']} V={s['v']} "
                 f"world={s['world']} {s['dtype']} (CPU, gloo)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--h", type=int, default=1024, help="hidden size")
    ap.add_argument("--v", type=int, default=32000, help="vocabulary size")
    ap.add_argument("--world", type=int, default=2, help="gloo processes")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="compute dtype (the head's master is fp32)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (each path once per round)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per path after the check step")
    ap.add_argument("--losses", default=",".join(LOSSES), help="comma list of: ce, kd (NLL + offline top-k KD)")
    ap.add_argument("--topk", type=int, default=8, help="proxy top-k entries per token (kd)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: CPUs // world, at least 1)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (e.g. benchmarks/results/fsdp_head.json)")
    ap.add_argument("--plot", type=Path, default=None, help="write a bar chart here (png)")
    a = ap.parse_args(argv)
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.world)
    try:
        cfg = Config(n=a.n, h=a.h, v=a.v, world=a.world, dtype=a.dtype, repeats=a.repeats, warmup=a.warmup,
                     losses=tuple(x.strip() for x in a.losses.split(",") if x.strip()), topk=a.topk, threads=threads)
    except ValueError as exc:
        ap.error(str(exc))
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, a = parse_args(argv)
    res = run(cfg)
    print(table(res))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
    if a.plot is not None:
        plot(res, a.plot)
    ok = all(r["agree"] for paths in res["results"].values() for r in paths.values())
    if not ok:
        print(f"MISMATCH: a path disagrees with the fp64 reference beyond {TOLERANCE[cfg.dtype]:.0e}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
