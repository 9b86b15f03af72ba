# The two commands of the README: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# where torch comes from: empty for pip's own configuration (here a local CPU
# wheel); elsewhere, e.g. https://download.pytorch.org/whl/cpu for the CPU build
TORCH_INDEX ?=

.PHONY: demo test bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so pip never resolves the range to a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m geocomplexity.demo
	$(VENV)/bin/geocomplexity reproduce all --preset quick --out results

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q

# tuned malloc first (the README's tables), then glibc's defaults for comparison
bench: $(STAMP)
	$(PY) benchmarks/bench_measure.py
	$(PY) benchmarks/bench_regularizers.py
	$(PY) benchmarks/bench_coupled.py
	$(PY) benchmarks/bench_measure.py --malloc default --out benchmarks/results/measure_glibc_default.json
	$(PY) benchmarks/bench_regularizers.py --malloc default --out benchmarks/results/regularizers_glibc_default.json

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
