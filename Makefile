# Two commands on a fresh clone: `make run` (the tiny pipeline) and `make test` (lint, then the test suite).
# Both create .venv/ with Python 3.13 once and reuse it; it is rebuilt only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.13 >/dev/null 2>&1 && echo python3.13 || echo env PYENV_VERSION=3.13.0 python3.13)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) run.py pipeline

# tests/unit: no Ray and no subprocess; tests/integration: the commands, Ray's pools and clusters
test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest tests/unit
	$(PY) -m pytest tests/integration
