# privrec: `make demo` runs a generated day through the nightly DAG; `make test` runs the suite.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PRIVREC_LAKE ?= $(CURDIR)/lake
DEMO_DATE ?= 2026-01-15

.PHONY: setup demo test bench mutants airflow lint clean-lake

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh privrec_pipeline/airflow_plugin/assets/package-lock.json
	@bash scripts/setup.sh

setup: $(STAMP)

demo: $(STAMP)
	@$(BIN)/privrec keys init
	@$(BIN)/privrec generate --date $(DEMO_DATE) --events 200000 --users 50000 --items 1000 --bad-rate 0.002
	@$(BIN)/privrec run --date $(DEMO_DATE) -p train_window_days=1 -p train_epsilon=4

# Two xdist workers, a file each at a time (module-scoped deployments stay in one process).
PYTEST_WORKERS ?= 2
test: $(STAMP)
	@$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	@$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

mutants: $(STAMP)
	@$(BIN)/python scripts/mutants.py $(MUTANT_ARGS)

airflow: $(STAMP)
	@$(BIN)/privrec airflow

lint: $(STAMP)
	@$(BIN)/ruff check privrec_pipeline jobs dags tests benchmarks scripts

clean-lake:
	rm -rf "$(PRIVREC_LAKE)"
