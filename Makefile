# cstoolkit — `make demo` runs the default recipe, `make test` runs the tests.
# Both use the active virtualenv, or create .venv if none is active.
SHELL := /bin/bash
PYTHON ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.cstoolkit-installed
RECIPE ?= recipes/unziplora.yaml

.PHONY: install demo test lint bench-sdxl bench-style-share clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cstoolkit run $(RECIPE) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench-sdxl: $(STAMP)
	$(BIN)/python benchmarks/sdxl_step.py

bench-style-share: $(STAMP)
	$(BIN)/python benchmarks/style_share_speed.py

clean:
	rm -rf runs build *.egg-info .pytest_cache .ruff_cache
