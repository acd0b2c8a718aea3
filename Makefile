# Everyday commands. `make demo` runs a flow in its own container end to end; `make test`
# runs the whole test suite. Both set up what they need (venv, Docker engine, local images).
# `make unit` is the fast suite (no Docker, no Prefect server): ruff and tests/unit.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test unit demo lint setup docker images test-tools clean

# Two pytest processes (pytest-xdist): most of an integration test is waiting on containers
# and servers. Tests that share a module fixture or the Swarm engine stay in one process
# (tests/conftest.py); `pytest -n 0` runs everything in one.
test: setup test-tools
	$(BIN)/ruff check .
	$(BIN)/pytest -n 2

unit: $(BIN)/dockerworker
	$(BIN)/ruff check .
	$(BIN)/pytest tests/unit -q

demo: setup
	$(BIN)/python examples/demo.py

lint: $(BIN)/dockerworker
	$(BIN)/ruff check .

setup: $(BIN)/dockerworker images

# The test rig (testrig/, used by tests, bench and examples) is a package of its own, installed
# editable beside dockerworker: the runtime wheel holds only `dockerworker`.
$(BIN)/dockerworker: pyproject.toml testrig/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]' -e ./testrig
	touch $@

docker:
	scripts/ensure-docker.sh

images: docker
	images/build-local.sh

# Host tools of the git/S3 rigs (git, sshd, ssh-keygen, openssl): apt-get only when missing.
test-tools:
	scripts/ensure-test-tools.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info testrig/.venvs

# Side-by-side benchmark against prefect-docker's worker; ~15 min (BENCH_ARGS=--quick: ~5 min).
.PHONY: bench
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)
