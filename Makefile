# The README's two commands: `make demo` and `make test`. Both work on a fresh Debian machine:
# they create .venv, install the Python packages and, when missing, redis-server and
# prometheus-pushgateway from Debian's packages.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest system-deps venv bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	@bash .ci/system-deps.sh

lint: venv
	$(BIN)/ruff check fleet worker governor tests bench
	$(BIN)/ruff format --check fleet worker governor tests bench
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

pytest: venv system-deps
	$(BIN)/python -m pytest --cov --cov-report=term --cov-fail-under=80 -q

test: lint typecheck pytest

demo: venv system-deps
	$(BIN)/python -m worker demo

bench: venv system-deps
	$(BIN)/python bench/pipeline.py --sizes 10000,100000 --out bench/results/pipeline.json

clean:
	rm -rf $(VENV) .coverage .coverage.* .pytest_cache .mypy_cache .ruff_cache

# --- deployments (issue 12) ---------------------------------------------------------------------
.PHONY: docker-engine test-containers promtool-test

# A Docker engine, Compose v2 and local base images (no registry needed); see .ci/docker.sh.
docker-engine:
	@bash .ci/docker.sh

# The container suites only: the Compose smoke test, and the Redis-outage tests on a container.
test-containers: venv docker-engine
	TEST_REDIS=docker $(BIN)/python -m pytest -q tests/integration/test_compose_smoke.py \
		tests/integration/test_daemon_redis.py

promtool-test: system-deps
	promtool check config deploy/prometheus/prometheus.yml
	cd deploy/prometheus && promtool test rules alerts_test.yml
