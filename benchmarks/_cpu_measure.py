"""Process-level CPU measurement helpers: resident memory and its high-water mark.

Each variant runs in its own process; the high-water mark is reset after warm-up through
/proc/self/clear_refs so the peak covers the timed steps only, measured above the resident
set after warm-up (inputs, loaded libraries and compiled code).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

# glibc raises its mmap threshold after large frees and then keeps freed blocks resident, so a
# post-warm-up baseline would hide later peaks. A fixed threshold makes every large tensor an
# mmap that is returned on free: RSS then follows the live set for every variant alike.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mb() -> float:
    """Current resident set size in MB."""
    return _status_kb("VmRSS") / 1024


def reset_peak() -> bool:
    """Reset the resident high-water mark (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_mb() -> float:
    """Resident high-water mark since the last reset, in MB."""
    return _status_kb("VmHWM") / 1024


def measure(step: Callable[[], object], repeats: int, settle: Callable[[], object] | None = None) -> dict[str, float]:
    """Warm up twice, then time `repeats` steps; min/median seconds and peak MB above the settled baseline.

    The baseline is taken after the warm-up (compiled code, allocator pools and the like stay out
    of "memory above the inputs") and after `settle()`, which frees caches that should count
    against the step (e.g. our reusable workspace).
    """
    step()
    step()
    if settle is not None:
        settle()
    baseline = rss_mb()
    if not reset_peak():
        raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs: no peak-memory figure here")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"time_s": times[len(times) // 2], "min_s": times[0], "times_s": times,
            "baseline_mb": baseline, "peak_above_inputs_mb": peak_mb() - baseline}
