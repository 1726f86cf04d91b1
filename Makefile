# The two commands of README.md: `make run` (install, then the whole pipeline on the local preset)
# and `make test` (install with the test extras, then the whole test suite, slow tests included).
PYTHON ?= python3.11
VENV ?= .venv
PIP := $(VENV)/bin/python -m pip
EXTRAS ?= cpu
ARGS ?=

.PHONY: install install-dev run test test-fast lint bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python
	$(PIP) install --quiet -e '.[$(EXTRAS)]'

install-dev: $(VENV)/bin/python
	$(PIP) install --quiet -e '.[$(EXTRAS),dev]'

run: install
	$(VENV)/bin/vfm run -c local $(ARGS)

test: install-dev
	$(VENV)/bin/python -m pytest -q $(ARGS)

test-fast: install-dev
	$(VENV)/bin/python -m pytest -q -m "not slow" $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff check pipeline data_curation models orchestration tests bench

clean:
	rm -rf $(VENV) .cache runs mlflow.db mlruns
