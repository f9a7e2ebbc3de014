# One entry point: every target builds the virtualenv it needs first.
#   make demo   - the runnable example (the many-model demo arrives with the KServe adapter)
#   make test   - lint, type-check and the whole test suite
#   make bench  - the benchmarks (each prints a table, then one JSON line)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch for machines without a CUDA driver: the CPU wheel, pinned, so pip never pulls a
# multi-GB CUDA build. Where nvidia-smi exists the user's (or pip's default CUDA) torch is kept.
TORCH_CPU ?= torch==2.13.0
READY  := $(VENV)/.ready

.PHONY: demo example test lint bench clean

$(READY): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo example: $(READY)
	$(PY) examples/quickstart.py

lint: $(READY)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

bench: $(READY)
	for b in benches/hit_latency.py benches/load_throughput.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
