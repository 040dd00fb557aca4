# The verbs a person types. `make run` and `make test` set everything up on a fresh machine with
# only Python 3.11 and make: they install the pinned uv, then the locked dependencies.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: setup run test lint proto proto-check proto-breaking fmt clean bench bench-full bench-messaging bench-awareness bench-sync

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --python $(PYTHON)
	@touch $@

setup: $(VENV)/.synced  ## install the locked dependencies into .venv

run: setup  ## start all three services on the embedded default (SQLite under ./var, in-process pub/sub)
	$(BIN)/bimip run

test: setup  ## the whole test suite, on SQLite and on PostgreSQL + Redis
	$(BIN)/pytest

lint: setup proto-check proto-breaking  ## ruff, mypy, buf lint, generated code fresh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint protos

proto: setup  ## regenerate bimip/*/v1 from protos/
	PYTHON=$(BIN)/python scripts/gen_protos.sh

proto-check: setup  ## fail if regenerating the protobuf code would change anything
	PYTHON=$(BIN)/python scripts/gen_protos.sh --check

proto-breaking: setup  ## buf breaking against the proto version recorded in protos/BASELINE
	@if [ -s protos/BASELINE ]; then \
	  $(BIN)/buf breaking protos --against ".git#ref=$$(cat protos/BASELINE),subdir=protos"; \
	else echo "protos/BASELINE is empty: no released proto version to compare with"; fi

BENCH_ARGS ?=
bench: setup  ## every scenario, quick profile, embedded default (under 3 min); BENCH_ARGS="--only messaging idle"
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-full: setup  ## every scenario on both backends, reference durations (~15 min): the figures in BENCHMARKS.md
	$(BIN)/python -m bench --full $(BENCH_ARGS)

bench-messaging: setup  ## messaging alone, reference workload, next to the echo; BENCH_ARGS="--backend both"
	$(BIN)/python -m bench.messaging $(BENCH_ARGS)

bench-awareness: setup  ## awareness fan-out: 1,000 subscribers on two replicas, PostgreSQL + Redis (~1.5 min)
	$(BIN)/python -m bench.awareness $(BENCH_ARGS)

bench-sync: setup  ## sync catch-up of 10,000 and 100,000 entries on logs of 10,000 to 1,000,000 (~4 min)
	$(BIN)/python -m bench.sync $(BENCH_ARGS)

fmt: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
