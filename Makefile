# gatednorm developer entry points. `make run` and `make test` set everything up from nothing.
# torch is pinned to the local CPU wheel first: a loose `torch` requirement makes pip fetch a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.gatednorm-setup

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,triton]"
	# the upstream kernel, a test-only reference (its other dependencies are not needed)
	$(PY) -m pip install -q --no-deps "fla-core==0.6.0"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m gatednorm verify --quick
	# then a short benchmark on the present device (benchmarks/bench_cpu.py lands with the CPU benchmark work)
	@if [ -f benchmarks/bench_cpu.py ]; then $(PY) benchmarks/bench_cpu.py; else echo "benchmarks/bench_cpu.py not present yet"; fi

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
