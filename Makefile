# README documents `make demo` and `make test`; the rest are for maintainers.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit services services-down bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

services:
	bash scripts/services.sh up

services-down:
	bash scripts/services.sh down

unit: $(STAMP)
	$(BIN)/python -m pytest

test: $(STAMP) services lint typecheck
	$(BIN)/python -m pytest --durations=20

bench: $(STAMP) services
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/amqp_throughput.py
	$(BIN)/python benchmarks/kafka_throughput.py
	$(BIN)/python benchmarks/store_overhead.py
	$(BIN)/python benchmarks/store_ops.py
	$(BIN)/python benchmarks/sqs_throughput.py
	$(BIN)/python benchmarks/outbox_relay.py
	$(BIN)/python benchmarks/metrics_overhead.py
	$(BIN)/python benchmarks/scrape_cost.py
	$(BIN)/python benchmarks/tracing_overhead.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
