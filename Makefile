# Two commands for a new user (see README.md):
#   make serve   environment + sample studies + MONAI Label server with the EVLF app (offline demo model)
#   make test    environment + the default test run (what CI runs)
# The environment is (re)built when setup.cfg, pyproject.toml or constraints.txt change; constraints.txt holds
# every package at the version the test run last passed with (`make lock` rewrites it from .venv).

PYTHON ?= python3.11
VENV ?= .venv
STUDIES ?= sample-data
HOST ?= 127.0.0.1
PORT ?= 8000
# one intra-op thread: measured faster for the few-MB demo model on 2 cores (evlf bench infer, docs/app.md)
CONF ?= --conf torch_threads 1
PYTEST_ARGS ?=

BIN := $(VENV)/bin

.PHONY: env lock sample-data serve test lint format

env: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[test]"
	touch $@

lock: env
	$(BIN)/python -m pip freeze --exclude-editable > $(VENV)/freeze.txt
	(sed -n '/^#/p' constraints.txt; cat $(VENV)/freeze.txt) > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

sample-data: $(STUDIES)/.complete

$(STUDIES)/.complete: | $(VENV)/.installed
	$(BIN)/evlf make-sample-data $(STUDIES) --dicom
	touch $@

# `evlf serve` (monailabel_evlf/app/commands.py) runs MONAI Label's start_server with this venv's python on apps/evlf,
# the same way an installed wheel serves (there on its bundled app and demo model).
serve: env sample-data
	HF_HUB_OFFLINE=1 $(BIN)/evlf serve --studies $(STUDIES) --host $(HOST) --port $(PORT) $(CONF)

test: env
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: env
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: env
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .
