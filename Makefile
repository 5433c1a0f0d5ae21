# Two commands on a fresh clone: `make run` (the tiny pipeline) and `make test` (lint, then the test suite).
# Both create .venv/ with Python 3.13 once and reuse it; it is rebuilt only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.13 >/dev/null 2>&1 && echo python3.13 || echo env PYENV_VERSION=3.13.0 python3.13)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test test-slow venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) run.py pipeline

# tests/unit: no Ray and no subprocess; tests/integration: the commands, Ray's pools and clusters. Each runs in
# two pytest processes (pytest-xdist), one per core; the unit tests' torch takes one thread in each.
test: $(VENV)/.installed
	$(PY) -m ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/unit -n 2
	$(PY) -m pytest tests/integration -n 2 --dist loadfile

# the long end-to-end runs `make test` leaves out (iterations killed and resumed, a two-node cluster, full-size
# tiny configs)
test-slow: $(VENV)/.installed
	$(PY) -m pytest tests -m slow
