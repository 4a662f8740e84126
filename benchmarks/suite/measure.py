"""Peak memory above the inputs, on CPU (resident set) or CUDA (caching allocator), and the machine's tags.

CPU: benchmarks/_cpu_measure.py's method. The process runs with a fixed glibc mmap threshold
(MALLOC_ENV, set by the runner) so freed tensors leave the resident set; the baseline is the
resident set after the warm-up steps and after `settle()` (our reusable workspace released, so
its allocation counts against the step); the peak is VmHWM after /proc/self/clear_refs.
CUDA: the same with torch.cuda.memory_allocated / max_memory_allocated.
"""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _cpu_measure import MALLOC_ENV, peak_mb, reset_peak, rss_mb

__all__ = ["MALLOC_ENV", "MemoryMeter", "machine_tags"]


class MemoryMeter:
    """`start()` after the warm-up takes the baseline and resets the peak; `peak_above_mb()` after the steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline_mb = 0.0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.baseline_mb = rss_mb()
        if not reset_peak():
            raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs: no peak-memory figure here")

    def peak_above_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline_mb
        return peak_mb() - self.baseline_mb


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The CPU features that decide GEMM speed (bf16 dot products, AMX tiles)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]


def machine_tags(device: torch.device) -> dict:
    """Machine, device, thread count and load: what a reader needs to weigh the numbers."""
    tags = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpu_flags": _cpu_flags(),
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "load_avg": list(os.getloadavg()),
            "device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        tags.update(gpu_memory_gb=round(props.total_memory / 1e9, 1), sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        try:
            tags["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return tags
