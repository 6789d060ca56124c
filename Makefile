# One task runner for Kagura. Every target sets up .venv itself, so on a fresh machine
# `make demo` and `make test` are the only commands needed. Another Python gets its own venv:
#   make test PYTHON=python3.13 VENV=.venv-3.13
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck verifytypes pytest bench bench-suite bench-components clean

# llama.cpp built for AVX2, not for the machine (GGML_NATIVE): on a CPU with AMX (Xeon since
# Sapphire Rapids) a native build includes llama.cpp's AMX kernels, which crash the process
# (ggml-org/llama.cpp#20824); the tests' llama.cpp server would load the model with them. Kagura's
# embedded model keeps out of them whatever the build (providers/local.py).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# llama-cpp-python compiles on install (about 5 minutes on 2 cores). Not from pip's cache:
	# a wheel cached from a native build would be taken whatever CMAKE_ARGS says.
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/python -m pip install --quiet --no-cache-dir \
		-e '.[local,litellm,postgres,otel,encryption,ray,dev,bench]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the advanced-workflow examples on the embedded local model, then a look at what
# Kagura recorded of them (in $KAGURA_HOME/events.db, ~/.kagura by default).
demo: export COLUMNS ?= 120
demo: $(STAMP)
	$(BIN)/python examples/advanced_workflows/conditional_workflow.py
	$(BIN)/python examples/advanced_workflows/parallel_workflow.py
	$(BIN)/python examples/advanced_workflows/retry_workflow.py
	$(BIN)/python examples/advanced_workflows/durable_workflow.py
	$(BIN)/python examples/advanced_workflows/streaming_workflow.py
	$(BIN)/kagura monitor stats --since 15m
	$(BIN)/kagura monitor cost --by agent --since 15m
	$(BIN)/kagura monitor list --kind workflow --since 15m --limit 15

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	# The import rules of docs/architecture.md (contracts in pyproject.toml).
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# pyright --verifytypes on the public surface: prints the score and the symbols to annotate, and
# fails below the floor in .ci/type_completeness.py.
verifytypes: $(STAMP)
	$(BIN)/python .ci/type_completeness.py

pytest: $(STAMP)
	$(BIN)/pytest

# Benchmarks print figures; they are not tests. `bench` runs the suite of benchmarks/run_all.py
# (framework overhead against raw asyncio, LangGraph and LlamaIndex Workflows; fan-out; streaming;
# import time; the embedded model; the event store; durable runs; Ray), which writes
# docs/benchmarks.md (about 25 minutes), then the benchmarks of single components (about 3
# minutes).
bench: bench-suite bench-components

bench-suite: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

bench-components: $(STAMP)
	$(BIN)/python benchmarks/bench_recording.py
	$(BIN)/python benchmarks/bench_breaker.py
	$(BIN)/python benchmarks/bench_ratelimit.py

# The whole suite: lint, types, type completeness, tests.
test: lint typecheck verifytypes pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
