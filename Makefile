# Two commands do all set-up: `make run` and `make test` (both create .venv when missing).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 first: the CPU wheel on disk; a looser spec makes pip fetch the CUDA build (GBs).
# GPU users: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make test
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup run test lint format clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/moe-llava demo

test: setup
	$(VENV)/bin/ruff check src tests flows
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests flows
	$(VENV)/bin/ruff format --check src tests flows

format: setup
	$(VENV)/bin/ruff check --fix src tests flows
	$(VENV)/bin/ruff format src tests flows

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
