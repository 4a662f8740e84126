"""pytest options of the loss suite (benchmarks/bench_losses.py) and the machine tags in its JSON.

The runner (benchmarks/suite/run.py) starts one pytest process per case with --bench-case;
pytest-benchmark then writes its --benchmark-json with machine_info extended here.
"""

from __future__ import annotations

import importlib.metadata

LIBRARIES = ("torch", "triton", "proxykd_fast", "liger-kernel", "trl", "cut-cross-entropy", "quack-kernels",
             "transformers", "pytest-benchmark")


def pytest_addoption(parser) -> None:
    group = parser.getgroup("proxykd loss suite")
    group.addoption("--bench-case", default=None, help="the case to measure, as JSON (spec.Case fields)")
    group.addoption("--bench-out", default=None, help="where to write the case's record (status, parity, memory)")
    group.addoption("--bench-repeats", type=int, default=5, help="timed steps after the warm-up")
    group.addoption("--bench-device", default="auto", help="cpu, cuda or auto")
    group.addoption("--bench-threads", type=int, default=0, help="CPU threads (0: torch's default)")
    group.addoption("--bench-paired-floor", action="store_true",
                    help="after the timed steps, alternate floor and variant steps in this process (robust ratio)")


def library_versions() -> dict[str, str | None]:
    out = {}
    for dist in LIBRARIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Tag the JSON with the device, thread count, load and every peer library's version."""
    from benchmarks.suite.measure import machine_tags
    from benchmarks.suite.run import resolve_device

    machine_info["proxykd"] = machine_tags(resolve_device(config.getoption("--bench-device")))
    machine_info["libraries"] = library_versions()
