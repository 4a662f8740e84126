"""The loss benchmark suite: every loss, every peer that runs here, sweeps, a report and a regression gate.

    make bench          # python -m benchmarks.suite.run --preset full, then the report
    make bench-check    # python -m benchmarks.suite.check (pre-release regression gate)

spec: what is measured; inputs: the tensors; variants: ours and the peers; oracle: the fp64
parity gate; measure: memory and machine tags; run: one pytest-benchmark process per case;
report / roofline: REPORT.md and plots; check: the ratio regression gate.
"""
