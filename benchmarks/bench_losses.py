"""pytest-benchmark body of the loss suite: one case per process, started by benchmarks/suite/run.py.

    python -m pytest benchmarks/bench_losses.py --bench-case '{"loss": "ce", "variant": "ours", ...}' \
        --bench-out case.json --benchmark-json bench.json

Order inside the process: build inputs, build the variant (skip with its reason if it does not
apply here), run one step and check it against the fp64 oracle (a failing variant is recorded
as failing and not timed), one more warm-up step, release caches, take the memory baseline, then
`benchmark.pedantic` times `--bench-repeats` steps; the peak above the baseline is recorded.
"""

from __future__ import annotations

import gc
import json
import time
import traceback
from pathlib import Path

import pytest
import torch

from benchmarks.suite.inputs import build_inputs, valid_rows
from benchmarks.suite.measure import MemoryMeter
from benchmarks.suite.oracle import check, load_oracle
from benchmarks.suite.run import resolve_device
from benchmarks.suite.spec import Case, gemm_flops
from benchmarks.suite.variants import Unavailable, build


@pytest.fixture
def bench_case(request: pytest.FixtureRequest) -> Case:
    raw = request.config.getoption("--bench-case")
    if not raw:
        pytest.skip("run through benchmarks/suite/run.py (or pass --bench-case)")
    return Case(**json.loads(raw))


def _write(path: str | None, record: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=1))


def _paired_floor_ratio(case: Case, x: dict, device: torch.device, step, repeats: int) -> float:
    """Median over rounds of (variant step / GEMM-floor step), the two alternating in this process.

    Load that drifts over minutes (other jobs on the machine) hits both sides of each ratio alike,
    which the floor measured in its own process cannot offer; bench-check compares this ratio.
    """
    floor = build(Case(case.loss, "gemm-floor", case.dtype, case.n, case.h, case.v), x, device).step
    floor()
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        floor()
        t1 = time.perf_counter()
        step()
        ratios.append((time.perf_counter() - t1) / (t1 - t0))
    return sorted(ratios)[len(ratios) // 2]


def test_case(benchmark, bench_case: Case, request: pytest.FixtureRequest) -> None:
    """Parity first, then time and peak memory of one (loss, variant, dtype, shape)."""
    opt = request.config.getoption
    out_path, repeats = opt("--bench-out"), opt("--bench-repeats")
    device = resolve_device(opt("--bench-device"))
    if opt("--bench-threads"):
        torch.set_num_threads(opt("--bench-threads"))
    case = bench_case
    record: dict = {"case": case.to_dict(), "id": case.id, "device": str(device), "threads": torch.get_num_threads()}
    benchmark.group = f"{case.loss} {case.dtype} N={case.n} H={case.h} V={case.v}"
    benchmark.name = case.variant
    x = build_inputs(case, device)
    record["valid_rows"] = valid_rows(case, x)
    record["gemm_flops"] = gemm_flops(case.loss, record["valid_rows"], case.h, case.v)
    try:
        runner = build(case, x, device)
    except Unavailable as exc:
        _write(out_path, {**record, "status": "skipped", "reason": str(exc)})
        pytest.skip(str(exc))
    record.update(versions=runner.versions, note=runner.note)
    try:
        t0 = time.perf_counter()
        got = runner.step()
        record["first_step_s"] = time.perf_counter() - t0  # includes compilation for compiled peers
        if case.variant != "gemm-floor":
            oracle = load_oracle(case, device)
            record["parity"] = check(case, got, oracle, x)
            del oracle
        del got
        gc.collect()
        if not record.get("parity", {"ok": True})["ok"]:
            _write(out_path, {**record, "status": "failed-parity"})
            pytest.fail(f"{case.id}: parity failed: {record['parity']}")
        runner.step()
        runner.settle()
        meter = MemoryMeter(device)
        meter.start()

        def timed() -> None:  # returns nothing: no step's outputs stay alive during the next one
            runner.step()

        benchmark.pedantic(timed, rounds=repeats, iterations=1, warmup_rounds=0)
        record["peak_above_inputs_mb"] = meter.peak_above_mb()
        record["baseline_mb"] = meter.baseline_mb
        if opt("--bench-paired-floor") and case.variant != "gemm-floor":
            record["paired_floor_ratio"] = _paired_floor_ratio(case, x, device, runner.step, repeats)
    except Exception as exc:  # a peer's crash or OOM is a result too: recorded, the suite goes on
        _write(out_path, {**record, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[-1500:],
                          "traceback": traceback.format_exc()[-3000:]})
        raise
    stats = benchmark.stats.stats
    record.update(status="ok", times_s=list(stats.data), median_s=stats.median, min_s=stats.min, iqr_s=stats.iqr,
                  stddev_s=stats.stddev)
    benchmark.extra_info.update({k: v for k, v in record.items() if k not in ("times_s",)})
    _write(out_path, record)
