"""benchmarks/REPORT.md and the plots, generated from one merged suite JSON (benchmarks/suite/run.py).

    python -m benchmarks.suite.report benchmarks/results/suite_full_cpu.json [--readme]

Every figure in the report comes from that one file: time (median of the timed steps, min-max
in brackets), "x floor" (time over the GEMM-floor case of the same loss, dtype and shape, measured
in the same run), effective TFLOP/s on a GPU, and peak memory above the inputs. Variants that
did not run say why; variants that failed the fp64 parity gate have no time. --readme rewrites
the README's block between `<!-- bench:begin -->` and `<!-- bench:end -->` with the summary.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from . import roofline
from .spec import LOSSES, PRESETS, TITLES, Case, Shape

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "benchmarks" / "REPORT.md"
README = ROOT / "README.md"
MARKERS = ("<!-- bench:begin -->", "<!-- bench:end -->")
OURS = ("ours", "ours-chunked", "ours-fused")
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16"}
MIN_MB = 1.0  # below this a memory ratio is noise (page granularity), shown as a dash


class Results:
    """Case records of one run, indexed by (loss, dtype, shape) -> {variant: record}."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.suite = data["suite"]
        self.gpu = self.suite["device"].startswith("cuda")
        self.by_point: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for rec in self.suite["cases"]:
            c = Case(**rec["case"])
            self.by_point[(c.loss, c.dtype, Shape(c.n, c.h, c.v))][c.variant] = rec

    def point(self, loss: str, dtype: str, shape: Shape) -> dict[str, dict]:
        return self.by_point.get((loss, dtype, shape), {})

    def floor(self, loss: str, dtype: str, shape: Shape) -> float | None:
        rec = self.point(loss, dtype, shape).get("gemm-floor")
        return rec["median_s"] if rec and rec.get("status") == "ok" else None

    def best_peer(self, loss: str, dtype: str, shape: Shape) -> tuple[str, dict] | None:
        """The fastest timed variant that is neither ours nor the floor."""
        ok = [(v, r) for v, r in self.point(loss, dtype, shape).items()
              if v not in OURS and v != "gemm-floor" and r.get("status") == "ok"]
        return min(ok, key=lambda vr: vr[1]["median_s"]) if ok else None


def _fmt_s(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _time_cell(rec: dict) -> str:
    return f"{_fmt_s(rec['median_s'])} ({_fmt_s(min(rec['times_s']))}–{_fmt_s(max(rec['times_s']))})"


def _parity_cell(rec: dict) -> str:
    p = rec.get("parity")
    if not p:
        return "—"
    worst = max(p["errors"], key=lambda k: p["errors"][k] / p["tolerances"][k])
    return f"{'ok' if p['ok'] else 'FAIL'} ({worst} {p['errors'][worst]:.1e} ≤ {p['tolerances'][worst]:.0e})"


def _versions_of(rec: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in rec.get("versions", {}).items() if k != "torch")


def point_table(res: Results, loss: str, dtype: str, shape: Shape) -> list[str]:
    """The table of every variant at one point, then the ones not timed and why."""
    recs = res.point(loss, dtype, shape)
    floor = res.floor(loss, dtype, shape)
    head = "| variant | time (min–max) | × GEMM floor |" + (" TFLOP/s |" if res.gpu else "") + \
        " peak MB above inputs | parity vs fp64 (worst / tol) | notes |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    untimed = []
    order = sorted(recs.items(), key=lambda vr: (vr[0] != "gemm-floor", vr[0] not in OURS,
                                                  vr[1].get("median_s", float("inf"))))
    for variant, rec in order:
        if rec.get("status") != "ok":
            untimed.append(f"- `{variant}`: **{rec.get('status')}**, {_reason(rec)}")
            continue
        name = f"**{variant}**" if variant in OURS else f"`{variant}`"
        ratio = f"{rec['median_s'] / floor:.2f}" if floor else "—"
        cells = [name, _time_cell(rec), ratio]
        if res.gpu:
            cells.append(f"{rec['gemm_flops'] / rec['median_s'] / 1e12:.0f}")
        note = "; ".join(x for x in (rec.get("note", ""), _versions_of(rec)) if x)
        cells += [f"{rec['peak_above_inputs_mb']:.0f}", _parity_cell(rec), note]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ([""] + untimed if untimed else [])


def _reason(rec: dict) -> str:
    if rec.get("status") == "failed-parity":
        p = rec["parity"]
        return "fails parity: " + ", ".join(f"{k} error {p['errors'][k]:.2e} > {p['tolerances'][k]:.0e}"
                                            for k in p["failed"])
    return (rec.get("reason") or "").splitlines()[0][:300] if rec.get("reason") else "no reason recorded"


def sweep_table(res: Results, loss: str, dtype: str, shapes: list[Shape], axis: str) -> list[str]:
    """time / memory of every timed variant across the sweep's shapes."""
    variants = sorted({v for s in shapes for v, r in res.point(loss, dtype, s).items() if r.get("status") == "ok"},
                      key=lambda v: (v != "gemm-floor", v not in OURS, v))
    if not variants:
        return []
    head = "| variant | " + " | ".join(f"{axis}={getattr(s, axis.lower())}" for s in shapes) + " |"
    lines = [head, "|" + "---|" * (len(shapes) + 1)]
    for v in variants:
        cells = []
        for s in shapes:
            r = res.point(loss, dtype, s).get(v)
            cells.append(f"{_fmt_s(r['median_s'])}, {r['peak_above_inputs_mb']:.0f} MB"
                         if r and r.get("status") == "ok" else (r or {}).get("status", "—"))
        lines.append(f"| `{v}` | " + " | ".join(cells) + " |")
    return lines


def _sweeps(res: Results) -> tuple[list[Shape], list[Shape]]:
    preset = PRESETS[res.suite["preset"]]
    n_shapes = sorted({Shape(n, preset.main.h, preset.main.v) for n in (*preset.n_sweep, preset.main.n)},
                      key=lambda s: s.n)
    v_shapes = sorted({Shape(preset.v_sweep_n, preset.main.h, v) for v in preset.v_sweep}, key=lambda s: s.v)
    return n_shapes, v_shapes


def plot_loss(res: Results, loss: str, out: Path) -> Path | None:
    """time and memory vs N (and vs V) for every timed variant, solid fp32 / dashed bf16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_shapes, v_shapes = _sweeps(res)
    panels = [("N", n_shapes)] + ([("V", v_shapes)] if len(v_shapes) > 1 else [])
    if len(n_shapes) < 2 and len(panels) == 1:
        return None
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4 * len(panels)), squeeze=False)
    colors: dict[str, str] = {}
    for row, (axis, shapes) in enumerate(panels):
        for dtype, style in (("float32", "-"), ("bfloat16", "--")):
            variants = sorted({v for s in shapes for v, r in res.point(loss, dtype, s).items()
                               if r.get("status") == "ok"})
            for v in variants:
                pts = [(getattr(s, axis.lower()), res.point(loss, dtype, s)[v]) for s in shapes
                       if res.point(loss, dtype, s).get(v, {}).get("status") == "ok"]
                if not pts:
                    continue
                color = colors.setdefault(v, f"C{len(colors) % 10}")
                xs = [p[0] for p in pts]
                label = f"{v} {DTYPE_SHORT[dtype]}"
                lw = 2.5 if v in OURS else 1.2
                axes[row][0].plot(xs, [p[1]["median_s"] for p in pts], style, marker="o", color=color, lw=lw,
                                  label=label)
                axes[row][1].plot(xs, [p[1]["peak_above_inputs_mb"] for p in pts], style, marker="o", color=color,
                                  lw=lw, label=label)
        fixed = (f"H={shapes[0].h}, V={shapes[0].v}" if axis == "N" else f"N={shapes[0].n}, H={shapes[0].h}")
        axes[row][0].set(xlabel=axis, ylabel="time per step (s, median)", title=f"{TITLES[loss]}: time vs {axis}, "
                         f"{fixed}", xscale="log", yscale="log")
        axes[row][1].set(xlabel=axis, ylabel="peak MB above inputs", title=f"memory vs {axis}, {fixed}", xscale="log")
    axes[0][1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def summary_rows(res: Results) -> list[str]:
    """One row per loss and dtype at the main shape: ours against the floor and the best peer."""
    main = PRESETS[res.suite["preset"]].main
    lines = ["| loss | dtype | ours | × GEMM floor | best peer | ours / best peer (time) | ours / best peer "
             "(memory) |", "|---|---|---|---|---|---|---|"]
    for loss in LOSSES:
        for dtype in PRESETS[res.suite["preset"]].dtypes:
            recs = res.point(loss, dtype, main)
            ours = recs.get("ours")
            if not recs:
                continue
            floor = res.floor(loss, dtype, main)
            best = res.best_peer(loss, dtype, main)
            if not ours or ours.get("status") != "ok":
                lines.append(f"| {loss} | {DTYPE_SHORT[dtype]} | {ours.get('status') if ours else '—'} | | | | |")
                continue
            cells = [loss, DTYPE_SHORT[dtype], _fmt_s(ours["median_s"]),
                     f"{ours['median_s'] / floor:.2f}" if floor else "—"]
            if best:
                name, b = best
                mem = (f"{ours['peak_above_inputs_mb'] / b['peak_above_inputs_mb']:.2f} "
                       if b["peak_above_inputs_mb"] >= MIN_MB and ours["peak_above_inputs_mb"] >= MIN_MB else "— ")
                cells += [f"`{name}` {_fmt_s(b['median_s'])}, {b['peak_above_inputs_mb']:.0f} MB",
                          f"{ours['median_s'] / b['median_s']:.2f}", f"{mem}({ours['peak_above_inputs_mb']:.0f} MB)"]
            else:
                cells += ["none timed", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def roofline_section(gpu_results: dict[str, Results]) -> list[str]:
    n, h, v = roofline.TARGET
    lines = [f"Predicted time at N={n}, H={h}, V={v}, bf16 (`benchmarks/suite/roofline.py`): GEMM FLOPs "
             "(2·N·H·V per GEMM, as in the tables above) at the dense bf16 peak, plus the epilogue's HBM bytes "
             "at full bandwidth (chunked schedule: 10 B per logit of a differentiated head, 8 B of a no-grad "
             "head). H100 SXM: 989 TFLOP/s, 3.35 TB/s; H200 SXM: 989 TFLOP/s, 4.8 TB/s.", "",
             "| loss | GEMMs | TFLOP | epilogue GB | H100 predicted | H200 predicted | H100 measured | "
             "H200 measured |", "|---|---|---|---|---|---|---|---|"]
    for loss in LOSSES:
        p100, p200 = roofline.predict(loss, "H100"), roofline.predict(loss, "H200")
        measured = []
        for gpu in ("H100", "H200"):
            res = gpu_results.get(gpu.lower())
            rec = res.point(loss, "bfloat16", Shape(n, h, v)).get("ours") if res else None
            measured.append(f"{rec['median_s'] * 1e3:.1f} ms" if rec and rec.get("status") == "ok"
                            else "not measured (no GPU lent yet)")
        lines.append(f"| {loss} | {LOSSES[loss][0]} | {p100.flops / 1e12:.1f} | {p100.bytes / 1e9:.1f} | "
                     f"{p100.total_s * 1e3:.1f} ms ({p100.gemm_s * 1e3:.1f} + {p100.epilogue_s * 1e3:.1f}) | "
                     f"{p200.total_s * 1e3:.1f} ms ({p200.gemm_s * 1e3:.1f} + {p200.epilogue_s * 1e3:.1f}) | "
                     f"{measured[0]} | {measured[1]} |")
    ce100, ce200 = roofline.predict("ce", "H100"), roofline.predict("ce", "H200")
    lines += ["", "Cells read total (GEMMs + epilogue). The tile-fused strategy moves no logits but recomputes "
              f"them: one more GEMM per differentiated head (+{ce100.gemm_s / 3 * 1e3:.1f} ms at this shape), "
              f"more than the epilogue bytes it saves ({ce100.epilogue_s * 1e3:.1f} ms on H100, "
              f"{ce200.epilogue_s * 1e3:.1f} ms on H200 for CE); see benchmarks/HOPPER_NOTES.md."]
    return lines


def commit_label(info: dict) -> str:
    """pytest-benchmark's commit_info as one label: the id, and "(dirty)" for uncommitted changes."""
    return f"{info.get('id', '?')}{' (dirty)' if info.get('dirty') else ''}"


def _commits(data: dict) -> str:
    """The commit the cases were measured at, or each commit with its case count when a resumed run spans several."""
    commits = data["suite"].get("commits") or {commit_label(data.get("commit_info") or {}): 0}
    if len(commits) == 1:
        return f"Commit: `{next(iter(commits))}`"
    return "Commits: " + ", ".join(f"`{c}` ({n} case{'s' if n != 1 else ''})" for c, n in commits.items())


def _machine(data: dict) -> tuple[str, list[str]]:
    tags = data["machine_info"].get("proxykd", {})
    suite = data["suite"]
    dev = tags.get("device", "cpu")
    name = (f"{dev}" if dev != "cpu" else f"{tags.get('cpu_count')}-core CPU ({tags.get('cpu')}, "
            f"{', '.join(tags.get('cpu_flags', []))})")
    lines = [f"- Machine: {name}; {suite.get('threads') or 'default'} threads per case; {tags.get('platform', '')}",
             f"- Load: `{suite.get('uptime_start', '')}` at the start, `{suite.get('uptime_end', '')}` at the end "
             "(other jobs share this machine: absolute times are noisy, ratios within a run less so)"
             + "".join(f"; resumed at {seg.get('started', '?')} (`{seg.get('uptime_start', '')}`)"
                       for seg in suite.get("resumed", [])),
             f"- {_commits(data)}, run {suite.get('started', '')} → {suite.get('finished', '')}",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in data["machine_info"].get("libraries", {}).items()
                                        if v)]
    return name, lines


def _coverage(res: Results) -> list[str]:
    """How much of the planned run ran, so that a stopped run is not mistaken for a complete one."""
    counts: dict[str, int] = defaultdict(int)
    for rec in res.suite["cases"]:
        counts[rec.get("status", "?")] += 1
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    line = f"- Cases: {len(res.suite['cases'])} of {res.suite.get('planned', len(res.suite['cases']))} planned ({parts})"
    not_run = res.suite.get("not_run", [])
    if not_run:
        line += (f"; {len(not_run)} not run (the run was stopped; `{bench_command(res.suite['preset'])}` resumes it), "
                 f"e.g. `{not_run[0]}`")
    return [line]


def bench_command(preset: str) -> str:
    """The make command that reruns `preset` (the Makefile's default CPU preset is medium)."""
    return "make bench" if preset == "medium" else f"BENCH_PRESET={preset} make bench"


def render(data: dict, gpu_results: dict[str, Results], plots: dict[str, str]) -> str:
    res = Results(data)
    preset = PRESETS[res.suite["preset"]]
    name, machine = _machine(data)
    main = preset.main
    out = ["# Loss benchmark report", "",
           f"Generated by `python -m benchmarks.suite.report` from `{data.get('_source', '')}` "
           f"(preset `{preset.name}`, {res.suite['repeats']} timed steps per case). Do not edit by hand: "
           f"rerun `{bench_command(preset.name)}`.", ""] + machine + _coverage(res) + ["",
           "## How to read it", "",
           "- Every case (loss × variant × dtype × shape) runs in its own process (pytest-benchmark). It first "
           "passes a parity check against an fp64 reference at that shape (loss or per-token outputs, dX, dW; "
           "tolerance max(1e-4 fp32 / 1e-2 bf16, 4× plain torch's own error)); a failing variant is not timed.",
           "- Time: median of the timed steps after one warm-up step (plus the parity step), min–max in brackets; "
           "forward + backward (top-k: forward only).",
           "- × GEMM floor: time over the `gemm-floor` case of the same point, measured in the same run: the "
           "loss's GEMMs alone (logits of each model, dX, dW) at full size over the scored rows, in the input "
           "dtype, with nothing else.",
           "- Peak memory above inputs: resident set (CPU; fixed glibc mmap threshold, baseline after warm-up "
           "with caches released) or allocator peak (GPU), including the gradients a step returns.",
           "- Losses: CE mean over scored tokens; per-token log-probs and entropy differentiated through fixed "
           "random upstream gradients; top-10; Proxy-KD = NLL + forward KL (alpha 1, T 1) to the online proxy or "
           "to its top-10 (renormalized); DPO = sigmoid DPO (beta 0.1) + chosen NLL, 2 pairs of T = N/4 "
           "positions with ragged prompt/padding masks. Every 50th label of the token losses is ignored.",
           "", "## Summary at the main shape", "",
           f"N={main.n}, H={main.h}, V={main.v}.", ""] + summary_rows(res)
    n_shapes, v_shapes = _sweeps(res)
    for loss in LOSSES:
        if not any(k[0] == loss for k in res.by_point):
            continue
        out += ["", f"## {loss}: {TITLES[loss]}", ""]
        if loss in plots:
            out += [f"![{loss}]({plots[loss]})", ""]
        for dtype in preset.dtypes:
            if not res.point(loss, dtype, main):
                continue
            out += [f"### {DTYPE_SHORT[dtype]}, N={main.n}, H={main.h}, V={main.v}", ""]
            out += point_table(res, loss, dtype, main) + [""]
            for axis, shapes in (("N", n_shapes), ("V", v_shapes)):
                tbl = sweep_table(res, loss, dtype, shapes, axis)
                if len(shapes) > 1 and tbl:
                    fixed = f"H={main.h}, V={main.v}" if axis == "N" else f"N={shapes[0].n}, H={main.h}"
                    out += [f"Sweep over {axis} ({fixed}; time, peak MB above inputs):", ""] + tbl + [""]
    out += ["", "## Roofline on Hopper", ""] + roofline_section(gpu_results)
    out += ["", "## Rerun", "",
            f"`{bench_command(preset.name)}` (this report), `BENCH_PRESET=gpu make bench` on a GPU, "
            "`make bench-check` before a release (ratios against the recorded run, see "
            "benchmarks/suite/check.py). Case records of a run stay in benchmarks/results/runs/ and a killed run "
            "resumes where it stopped.", ""]
    return "\n".join(out)


def summary_markdown(data: dict, report_rel: str = "benchmarks/REPORT.md") -> str:
    """The README's benchmark block: the machine and the summary table, quoted from the report."""
    res = Results(data)
    main = PRESETS[res.suite["preset"]].main
    name, machine = _machine(data)
    return "\n".join([f"Quoted from [{report_rel}]({report_rel}) (generated by `{bench_command(res.suite['preset'])}` "
                      "from one run; every "
                      "variant passed the fp64 parity gate before being timed, and each case ran in its own "
                      "process). Main shape N={}, H={}, V={}, forward + backward:".format(main.n, main.h, main.v), "",
                      *machine[:2], ""] + summary_rows(res))


def write_report(json_path: Path | str, report: Path = REPORT, readme: bool = False) -> Path:
    """Write REPORT.md (and plots next to the JSON); with readme=True refresh the README block."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    try:
        data["_source"] = str(json_path.resolve().relative_to(ROOT))
    except ValueError:
        data["_source"] = str(json_path)
    res = Results(data)
    gpu_results = {}
    for path in sorted(json_path.parent.glob("suite_gpu_*.json")):
        gpu_results[path.stem.split("_")[-1]] = Results(json.loads(path.read_text()))
    plots = {}
    plot_dir = json_path.parent / "plots"
    for loss in LOSSES:
        p = plot_loss(res, loss, plot_dir / f"{json_path.stem}_{loss}.png")
        if p:
            plots[loss] = str(p.resolve().relative_to(report.parent.resolve())) if p.resolve().is_relative_to(
                report.parent.resolve()) else str(p)
    report.write_text(render(data, gpu_results, plots))
    if readme:
        text = README.read_text()
        begin, end = MARKERS
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            README.write_text(head + begin + "\n" + summary_markdown(data) + "\n" + end + tail)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", default=str(ROOT / "benchmarks" / "results" / "suite_full_cpu.json"))
    ap.add_argument("--out", default=str(REPORT))
    ap.add_argument("--readme", action="store_true", help="also refresh the README's benchmark block")
    args = ap.parse_args(argv)
    print(f"wrote {write_report(args.json, Path(args.out), args.readme)}")


if __name__ == "__main__":
    main()
