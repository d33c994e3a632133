# Two commands on a fresh clone: `make demo` and `make test`. Each sets up from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (pinned so pip never pulls a multi-GB CUDA build on CPU machines).
TORCH ?= torch==2.13.0

.PHONY: install fetch demo test test-fast lint bench clean

$(BIN)/sap: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,serve]'
	touch $(BIN)/sap

install: $(BIN)/sap

fetch: install
	$(BIN)/sap fetch

demo: install
	$(BIN)/sap demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q

# ruff and mypy over src/ (configured in pyproject.toml).
lint: install
	$(BIN)/ruff check src
	$(BIN)/mypy

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/bench_extraction.py

clean:
	rm -rf $(VENV) runs .pytest_cache
