# Prompt Gateway control plane. `make run` and `make test` do every set-up step themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install run demo test test-fast lint format kafka-up kafka-down kafka-reset kafka-status topics bench system-deps api-fuzz chaos clean

help: ## Show the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  \033[1m%-13s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create the virtualenv and install the project with its dev tools

kafka-up: ## Start the local single-node Kafka (KRaft) on 127.0.0.1:9092; no-op when up
	@scripts/kafka.sh up

kafka-down: ## Stop the local Kafka broker
	@scripts/kafka.sh down

kafka-reset: ## Stop Kafka and wipe its data and the workers' state dirs
	@scripts/kafka.sh reset

kafka-status: ## Say whether the local broker runs
	@scripts/kafka.sh status

topics: $(STAMP) kafka-up ## Create missing topics from topics.yaml and check existing ones
	@$(PY) -m streams.admin

run: $(STAMP) kafka-up topics ## Run the whole system: control-plane worker, provider worker, web API
	@$(PY) -m streams.run

demo: $(STAMP) kafka-up topics ## Run the system, submit a few jobs and print their results and timelines
	@$(PY) -m streams.run --demo

lint: $(STAMP) ## ruff (lint + format check) and mypy --strict on every package
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy domain tables streams api providers bench tests cli

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint system-deps kafka-up ## Lint, then every test tier against the real broker
	$(PY) -m pytest $(PYTEST_ARGS)

system-deps: ## Install kcat, prometheus, chromium and wrk for the tests and benchmarks that drive them (Debian, root)
	@scripts/system-deps.sh

bench: $(STAMP) system-deps kafka-up ## Measure throughput, latency, memory, listing and read cost, scale-out, partition cost; append to bench/results.md
	$(PY) -m bench.throughput
	$(PY) -m bench.reads $(READS_ARGS)
	$(PY) -m bench.listing $(LIST_ARGS)
	$(PY) -m bench.scale $(SCALE_ARGS)
	$(PY) -m bench.partitions $(PARTITIONS_ARGS)

api-fuzz: $(STAMP) kafka-up ## Fuzz the HTTP API of a fresh two-worker stack with schemathesis
	$(PY) -m tests.api.fuzz $(FUZZ_ARGS)

chaos: $(STAMP) kafka-up ## Run the fault battery on the real broker; append its table to tests/chaos/results.md
	$(PY) -m tests.chaos $(CHAOS_ARGS)

test-fast: $(STAMP) ## Unit and agent tests only (no broker)
	$(PY) -m pytest tests/unit tests/agents $(PYTEST_ARGS)

clean: ## Remove the virtualenv, caches and local state (not the Kafka jars)
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
