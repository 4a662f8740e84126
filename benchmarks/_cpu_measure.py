"""Process-level CPU measurement helpers: resident memory and its high-water mark.

Each variant runs in its own process; the high-water mark is reset after warm-up through
/proc/self/clear_refs so the peak covers the timed step only, measured above the inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mb() -> float:
    """Current resident set size in MB."""
    return _status_kb("VmRSS") / 1024


def reset_peak() -> None:
    """Reset the resident high-water mark (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float:
    """Resident high-water mark since the last reset, in MB."""
    return _status_kb("VmHWM") / 1024


def measure(step: Callable[[], object], baseline_mb: float, repeats: int) -> dict[str, float]:
    """Warm up once, then time `repeats` steps; report min/median seconds and peak MB above baseline."""
    step()
    reset_peak()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"time_s": times[0], "median_s": times[len(times) // 2], "peak_above_inputs_mb": peak_mb() - baseline_mb}
