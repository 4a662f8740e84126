"""Run the loss suite: every case in its own pytest-benchmark process, resumable, then one merged JSON.

    python -m benchmarks.suite.run --preset medium          # make bench (CPU: N=1024 + sweeps, ~70 min on 2 cores)
    python -m benchmarks.suite.run --preset full            # the issue's N=4096 CPU shape + sweeps (many hours)
    python -m benchmarks.suite.run --preset gpu             # on a GPU
    python -m benchmarks.suite.run --preset small --losses ce,kd_online --variants ours,gemm-floor,naive

Per (loss, dtype, shape) an oracle job computes the fp64 reference first (cached). Each case then
runs `pytest benchmarks/bench_losses.py --bench-case ... --benchmark-json ...` with the fixed
glibc mmap threshold of benchmarks/_cpu_measure.py, so its peak memory is its own. Case records
land in results/runs/<run>/cases/ as they finish: a killed run resumes where it stopped (cases
already recorded are not re-run; --retry-errors re-runs those that crashed). The merged file,
results/suite_<preset>_<device>.json, is pytest-benchmark's JSON format (machine_info,
commit_info, benchmarks) plus a "suite" block with every case, timed or not, and its reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from .spec import DTYPES, LOSSES, PRESETS, Case, Preset

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DONE = ("ok", "skipped", "failed-parity")


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_tag(device: torch.device) -> str:
    """cpu, or the GPU's name in lower case (h100, h200, ...)."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]\d{2,4})\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def plan(preset: Preset, losses: list[str], variants: list[str] | None, dtypes: list[str],
         main_only: bool = False) -> list[Case]:
    """Every case, main shape first (the headline tables fill in first), then the sweeps."""
    from .variants import variants_for

    cases = []
    shapes = preset.shapes()
    for shape in shapes[:1] if main_only else shapes:
        for loss in losses:
            for dtype in dtypes:
                for variant in variants_for(loss):
                    if shape != shapes[0] and variant in preset.main_only:
                        continue
                    if variants is None or variant in variants:
                        cases.append(Case(loss, variant, dtype, shape.n, shape.h, shape.v))
    return cases


def _env(threads: int) -> dict[str, str]:
    from .measure import MALLOC_ENV

    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)  # timed kernels are compiled, never interpreted
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_oracle(case: Case, args: argparse.Namespace, log: Path) -> str | None:
    """Compute (and cache) the fp64 reference of `case` in its own process; the error text on failure."""
    from .oracle import oracle_path

    if oracle_path(case).exists():
        return None
    cmd = [sys.executable, "-m", "benchmarks.suite.run", "--oracle-job", json.dumps(case.to_dict()),
           "--device", args.device, "--threads", str(args.threads)]
    with log.open("a") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(args.threads), stdout=fh, stderr=subprocess.STDOUT,
                              timeout=args.case_timeout)
    return None if proc.returncode == 0 else f"oracle job failed (exit {proc.returncode}), see {log}"


def run_case(case: Case, args: argparse.Namespace, cases_dir: Path, repeats: int) -> dict:
    """One pytest-benchmark process for `case`; returns its record."""
    out, bench = cases_dir / f"{case.id}.json", cases_dir / f"{case.id}.bench.json"
    log = cases_dir / f"{case.id}.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           str(ROOT / "benchmarks" / "bench_losses.py"), "--bench-case", json.dumps(case.to_dict()),
           "--bench-out", str(out), "--bench-repeats", str(repeats), "--bench-device", args.device,
           "--bench-threads", str(args.threads), "--benchmark-json", str(bench), "--benchmark-quiet"]
    if args.paired_floor:
        cmd.append("--bench-paired-floor")
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        with log.open("w") as fh:
            proc = subprocess.run(cmd, cwd=ROOT, env=_env(args.threads), stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=args.case_timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    record = json.loads(out.read_text()) if out.exists() else {}
    if not record or (record.get("status") == "ok" and not bench.exists()):
        tail = log.read_text()[-1500:] if log.exists() else ""
        record = {"case": case.to_dict(), "id": case.id, "status": "error",
                  "reason": f"case process ended ({code}) without a record: {tail}"}
        out.write_text(json.dumps(record, indent=1))
    record["wall_s"] = time.perf_counter() - t0  # process start, imports, parity, warm-up, timed steps
    out.write_text(json.dumps(record, indent=1))
    return record


def merge(run_dir: Path, cases: list[Case], meta: dict) -> dict:
    """pytest-benchmark JSON of all timed cases + the suite block of every case (in plan order)."""
    from .report import commit_label

    merged: dict = {"benchmarks": []}
    records, not_run = [], []
    commits: dict[str, int] = {}  # commit -> timed cases measured at it (a resumed run can span commits)
    for case in cases:
        rec_path = run_dir / "cases" / f"{case.id}.json"
        if not rec_path.exists():
            not_run.append(case.id)
            continue
        records.append(json.loads(rec_path.read_text()))
        bench_path = run_dir / "cases" / f"{case.id}.bench.json"
        if records[-1].get("status") == "ok" and bench_path.exists():
            bench = json.loads(bench_path.read_text())
            for key in ("machine_info", "commit_info", "version"):
                merged.setdefault(key, bench.get(key))
            merged["benchmarks"].extend(bench["benchmarks"])
            commit = commit_label(bench.get("commit_info") or {})
            commits[commit] = commits.get(commit, 0) + 1
    if "machine_info" not in merged:  # nothing timed: still name the machine
        from benchmarks.conftest import library_versions

        from .measure import machine_tags

        merged["machine_info"] = {"proxykd": machine_tags(resolve_device(meta["device"])),
                                  "libraries": library_versions()}
    merged["datetime"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    merged["suite"] = {**meta, "planned": len(cases), "not_run": not_run, "commits": commits, "cases": records}
    return merged


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: list[str] | None = None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="medium", choices=sorted(PRESETS))
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--variants", default=None, help="comma list (default: every variant of each loss)")
    ap.add_argument("--dtypes", default=None, help=f"comma list of {DTYPES} (default: the preset's)")
    ap.add_argument("--main-only", action="store_true", help="only the preset's main shape (no sweeps)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per case (default: the preset's, >= 5)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2 if not torch.cuda.is_available() else 0,
                    help="CPU threads per case (default 2 on CPU)")
    ap.add_argument("--run-name", default=None, help="results/runs/<name> (default <preset>_<device>)")
    ap.add_argument("--out", default=None, help="merged JSON (default results/suite_<preset>_<device>.json)")
    ap.add_argument("--case-timeout", type=int, default=3600)
    ap.add_argument("--retry-errors", action="store_true", help="re-run cases recorded as errors")
    ap.add_argument("--fresh", action="store_true", help="forget recorded cases of this run and start over")
    ap.add_argument("--no-report", action="store_true", help="skip REPORT.md and the plots")
    ap.add_argument("--readme", action="store_true", help="also refresh the README's benchmark block")
    ap.add_argument("--merge-only", action="store_true",
                    help="run nothing: merge the cases recorded so far (a run in progress or stopped) and report")
    ap.add_argument("--paired-floor", action="store_true",
                    help="also time each variant alternating with the GEMM floor in its own process (bench-check)")
    ap.add_argument("--oracle-job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.oracle_job:
        from .oracle import compute_oracle

        if args.threads:
            torch.set_num_threads(args.threads)
        compute_oracle(Case(**json.loads(args.oracle_job)), device)
        return None

    from tqdm import tqdm

    from .variants import precheck

    preset = PRESETS[args.preset]
    losses = args.losses.split(",")
    unknown = [loss for loss in losses if loss not in LOSSES]
    if unknown:
        ap.error(f"unknown losses {unknown}; choose from {list(LOSSES)}")
    dtypes = args.dtypes.split(",") if args.dtypes else list(preset.dtypes)
    repeats = args.repeats or preset.repeats
    if repeats < 5:
        ap.error("--repeats must be >= 5 (time is the median and spread of at least 5 steps)")
    tag = device_tag(device)
    run_dir = RESULTS / "runs" / (args.run_name or f"{args.preset}_{tag}")
    cases_dir = run_dir / "cases"
    if args.fresh and cases_dir.exists():
        for f in cases_dir.iterdir():
            f.unlink()
    cases_dir.mkdir(parents=True, exist_ok=True)
    cases = plan(preset, losses, args.variants.split(",") if args.variants else None, dtypes, args.main_only)
    meta = {"preset": args.preset, "device": str(device), "repeats": repeats, "threads": args.threads,
            "uptime_start": _uptime(), "started": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    print(f"{len(cases)} cases ({args.preset}, {device}, {args.threads or 'default'} threads) -> {run_dir}")
    meta_path = run_dir / "meta.json"
    prior = json.loads(meta_path.read_text()) if meta_path.exists() and any(cases_dir.iterdir()) else {}
    if args.merge_only:
        meta.update({k: v for k, v in prior.items() if k in ("uptime_start", "started", "uptime_end", "finished",
                                                              "resumed")})
        cases_iter = []
    else:
        if prior:  # a resumed run: it started when its first segment did; each later segment is listed
            segment = {"started": meta["started"], "uptime_start": meta["uptime_start"]}
            meta.update(started=prior.get("started", meta["started"]),
                        uptime_start=prior.get("uptime_start", meta["uptime_start"]),
                        resumed=[*prior.get("resumed", []), segment])
        meta_path.write_text(json.dumps(meta))
        cases_iter = cases
    progress = tqdm(cases_iter, unit="case", dynamic_ncols=True)
    for case in progress:
        rec_path = cases_dir / f"{case.id}.json"
        if rec_path.exists():
            status = json.loads(rec_path.read_text()).get("status")
            if status in DONE or (status == "error" and not args.retry_errors):
                continue
        progress.set_description(case.id)
        why = precheck(case, device)
        if why:
            rec_path.write_text(json.dumps({"case": case.to_dict(), "id": case.id, "status": "skipped",
                                            "reason": why}, indent=1))
            continue
        err = None if case.variant == "gemm-floor" else run_oracle(case, args, run_dir / "oracle.log")
        if err:
            rec_path.write_text(json.dumps({"case": case.to_dict(), "id": case.id, "status": "error",
                                            "reason": err}, indent=1))
            continue
        rec = run_case(case, args, cases_dir, repeats)
        tail = f"{rec.get('median_s', 0):.3f} s" if rec["status"] == "ok" else rec.get("reason", "")[:80]
        progress.write(f"{case.id}: {rec['status']} {tail}")
    if not args.merge_only:
        meta.update(uptime_end=_uptime(), finished=datetime.datetime.now(datetime.timezone.utc).isoformat())
        meta_path.write_text(json.dumps(meta))
    merged = merge(run_dir, cases, meta)
    out = Path(args.out) if args.out else RESULTS / f"suite_{args.preset}_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1))
    print(f"wrote {out}")
    if not args.no_report:
        from .report import write_report

        print(f"wrote {write_report(out, readme=args.readme)}")
    return out


if __name__ == "__main__":
    main()
