# One entry point: every target builds the virtualenv it needs first.
#   make demo   - the main job: 500 models served over HTTP by the KServe adapter through one cache
#   make test   - lint, type-check and every test suite (core, KServe adapter, demo, Ray adapter)
#   make bench  - the benchmarks (each prints a table, then one JSON line)
#   make gpu-check - on a machine with an NVIDIA GPU: the cuda tests and gpu_load --quick, one
#                    JSON line; elsewhere it says so and exits 0. `make gpu-check PY=python3`
#                    uses that interpreter as it is (no virtualenv, no installs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch for machines without a CUDA driver: the CPU wheel, pinned by a constraints file for every
# pip command, so no later install (kserve's resolver once swapped it) pulls a multi-GB CUDA
# build. Where nvidia-smi exists the user's (or pip's default CUDA) torch is kept.
TORCH_CPU ?= torch==2.13.0
READY  := $(VENV)/.ready
PIN    := $(VENV)/constraints.txt
# The Ray Serve adapter has a virtualenv of its own: ray and kserve pin different protobufs.
RAY_VENV  ?= .venv-ray
RAY_PY    := $(RAY_VENV)/bin/python
RAY_READY := $(RAY_VENV)/.ready
RAY_PIN   := $(RAY_VENV)/constraints.txt

.PHONY: demo example test lint lint-ray test-ray bench bench-ray clean gpu-check gpu-check-run

# The core with its test and dev extras, and the KServe adapter (kserve is ~450 MB with its
# dependencies: it lives in the adapter's own distribution, never in the core's requirements).
$(READY): pyproject.toml adapters/kserve/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then : > $(PIN); else echo "$(TORCH_CPU)" > $(PIN); fi
	$(PY) -m pip install -q -c $(PIN) -e ".[dev]" -e "adapters/kserve[test]"
	touch $@

# The core with its test extra and the Ray Serve adapter (ray[serve], ~500 MB with its
# dependencies), with the same torch pin as the main virtualenv. Built after the main one (an
# order-only prerequisite) even under `make -j`: both install this checkout in editable mode, and
# setuptools rewrites modelcache.egg-info in the tree while it does, so two at once could read
# each other's half-written metadata. Under -j2 the Ray virtualenv builds while the main lint runs.
$(RAY_READY): pyproject.toml adapters/ray/pyproject.toml | $(READY)
	test -x $(RAY_PY) || $(PYTHON) -m venv $(RAY_VENV)
	$(RAY_PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then : > $(RAY_PIN); else echo "$(TORCH_CPU)" > $(RAY_PIN); fi
	$(RAY_PY) -m pip install -q -c $(RAY_PIN) -e ".[test]" -e "adapters/ray[test]"
	touch $@

demo: $(READY)
	$(PY) examples/many_models/demo.py

example: $(READY)
	$(PY) examples/quickstart.py

# The adapter's mypy runs from its own directory (its config finds the core in the checkout).
lint: $(READY)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	cd adapters/kserve && $(abspath $(PY)) -m mypy

# The Ray adapter's mypy (with its bench and example) needs ray installed: its own virtualenv.
lint-ray: $(RAY_READY)
	cd adapters/ray && $(abspath $(RAY_PY)) -m mypy

# Each suite has its own pytest configuration; any failure, or a suite that collects no tests
# (pytest's exit 5), stops make with a non-zero status.
# The Ray suite starts one local Ray cluster for all its tests (a few minutes on 2 cores).
test: lint lint-ray
	$(PY) -m pytest
	$(PY) -m pytest adapters/kserve
	$(PY) -m pytest examples/many_models/test_demo.py
	$(PY) -m pytest examples/embeddings/test_embeddings.py
	$(RAY_PY) -m pytest adapters/ray

test-ray: lint-ray
	$(RAY_PY) -m pytest adapters/ray

bench: $(READY)
	for b in benches/hit_latency.py benches/load_throughput.py benches/kserve_overhead.py; do $(PY) $$b || exit 1; done
	$(MAKE) --no-print-directory bench-ray

bench-ray: $(RAY_READY)
	$(RAY_PY) benches/ray_routing.py

# No GPU, no work: checked before any virtualenv is built. With PY given on the command line the
# check runs on that interpreter as it is; otherwise in the virtualenv, where the CUDA build of
# torch (pip's default where nvidia-smi exists) and CuPy are installed if missing.
GPU_DEPS := $(if $(filter command line,$(origin PY)),,$(READY))
gpu-check:
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "gpu-check: no NVIDIA GPU here (nvidia-smi not found): nothing to check"; \
	else \
		$(MAKE) --no-print-directory gpu-check-run; \
	fi

gpu-check-run: $(GPU_DEPS)
ifneq ($(origin PY),command line)
	$(PY) -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || \
		$(PY) -m pip install -q --force-reinstall torch
	$(PY) -c "import cupy" 2>/dev/null || $(PY) -m pip install -q "cupy-cuda12x>=13"
endif
	$(PY) benches/gpu_check.py

clean:
	rm -rf $(VENV) $(RAY_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .demo-store demo-results
