# gatednorm developer entry points. `make run` and `make test` set everything up from nothing.
#
#   make run     the main job: torch, Triton, numpy and the package (nothing else), then `gatednorm verify --quick`
#                and a short CPU benchmark
#   make test    adds the test tools and the frameworks gatednorm.patch() targets, then runs the test suite
#   make lint    ruff and the layer rules (import-linter)
#
# torch is pinned to the local CPU wheel and installed first: a loose `torch` requirement makes pip fetch a
# multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.gatednorm-setup
TEST_STAMP := $(VENV)/.gatednorm-test-setup

.PHONY: setup setup-test run test lint bench clean

# --- the main job: the package with its fused-kernel extra (EXTRAS= leaves Triton out: about 1 GB, used on
# GPUs only), and numpy, without which torch warns "Failed to initialize NumPy" once verify or the benchmark
# touch torch.compile's machinery ---
EXTRAS ?= triton
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_PIN)"
	$(PIP) install -e ".$(if $(strip $(EXTRAS)),[$(strip $(EXTRAS))])" numpy
	touch $@

# --- the tests: test tools, transformers (normal install, torch held by the constraints file) and the
# frameworks gatednorm.patch() targets. Everything with dependencies is installed before the --no-deps step:
# pip's consistency check on a later install would list every unmet pin of the --no-deps packages. ---
$(TEST_STAMP): $(STAMP) constraints-integrations.txt
	$(PIP) install -c constraints-integrations.txt -e ".[triton,test,integrations-test]"
	@echo "make: fla-core, sglang, vllm and mamba_ssm (source, CUDA extensions skipped) go in with --no-deps:" \
	      "their pins would replace the CPU torch, and the tests need only their gated-norm modules (docs/usage.md)"
	$(PIP) install --no-deps "fla-core==0.6.0" "sglang==0.5.23" "vllm==0.33.0"
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(PIP) install --no-deps --no-build-isolation \
		"mamba-ssm==2.3.2.post1"
	touch $@

setup: $(STAMP)

setup-test: $(TEST_STAMP)

run: setup
	$(PY) -m gatednorm verify --quick
	# then a short benchmark on the present device: native eager against the straightforward recipe
	$(PY) benchmarks/bench_cpu.py --quick --no-compile --no-memory --passes fwd

test: setup-test
	$(PY) -m pytest

lint: setup-test
	$(VENV)/bin/ruff check .
	# layer rules of docs/design.md ([tool.importlinter] in pyproject.toml); --no-cache: no cache folder in the tree
	$(VENV)/bin/lint-imports --no-cache

bench: setup
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
