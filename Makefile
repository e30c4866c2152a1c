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
	# --- integrations (issue 4): the frameworks gatednorm.patch() targets, for tests/test_integrations*.py ---
	# transformers with its (torch-free) dependencies; sglang and vLLM wheels without theirs (their pins would
	# replace torch; the tests load their gated-norm modules with the framework helpers stubbed);
	# mamba_ssm from its source release with the CUDA extensions skipped (pure-Python modules only).
	$(PY) -m pip install -q -c constraints-integrations.txt -e ".[integrations-test]"
	$(PY) -m pip install -q --no-deps "sglang==0.5.23" "vllm==0.33.0"
	$(PY) -m pip install -q setuptools wheel packaging ninja
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(PY) -m pip install -q --no-deps --no-build-isolation \
		"mamba-ssm==2.3.2.post1"
	# --- end integrations ---
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m gatednorm verify --quick
	# then a short benchmark on the present device: native eager against the straightforward recipe
	$(PY) benchmarks/bench_cpu.py --quick --no-compile --no-memory --passes fwd

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	# layer rules of docs/design.md ([tool.importlinter] in pyproject.toml); --no-cache: no cache folder in the tree
	$(VENV)/bin/lint-imports --no-cache

bench: setup
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
