# The two set-up commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test install install-test redis lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed first, at a pinned version, so that `pip install -e .` finds it and leaves it alone.
# Which build pip picks is up to where it looks: from PyPI on Linux that is the multi-GB CUDA build. To get the
# CPU-only build, name the index that holds it:
#     make run TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (any index works: a CUDA one, a mirror). Left empty, pip's own configuration decides: this project's machines
# point it at a local wheel folder that holds the CPU build (`pip config list` shows where yours looks).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install -q -e .

# The suite smoke-runs every benchmark, so it needs the benchmarks' extra too.
install-test: install
	$(BIN)/pip install -q -e ".[test,bench]"

# `kubectl kustomize` renders deploy/kubernetes/ in the tests (no cluster). Debian's own archive has no `kubectl`
# (bookworm's `kubernetes-client` is 1.20, whose kustomize cannot read these files): the package comes from the
# Kubernetes apt repository (pkgs.k8s.io) or Google's (packages.cloud.google.com).
redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	@command -v kubectl >/dev/null || { apt-get update -qq && apt-get install -y -qq kubectl >/dev/null; } \
		|| { echo "kubectl is missing: add the apt repository of https://pkgs.k8s.io and run make again" >&2; exit 1; }

run: install
	$(BIN)/softserve serve

# The tests that assert no time bound run on TEST_WORKERS processes at once (pytest-xdist); those marked `timing`
# then run alone, one at a time, so that nothing else on the machine moves their bounds. Three workers on two cores:
# the tests wait on servers, sockets and subprocesses for a share of their time (318 s against 345 s with two).
TEST_WORKERS ?= 3

test: install-test redis
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not timing"
	$(BIN)/python -m pytest -q -m timing

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench:
	$(BIN)/python bench/mixed_vs_single.py
	$(BIN)/python bench/server_vs_raw.py
	$(BIN)/python bench/mixed_vs_per_task.py
