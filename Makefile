# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv, then `dvc repro` on the bundled synthetic Cityscapes-format data
#   make test   install into .venv, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow test-all lint install

$(BIN)/seg: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[orchestration,dev]' -c constraints.txt
	touch $(BIN)/seg

install: $(BIN)/seg

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

# the everyday suite (e2e runs of dvc repro and a Prefect server included): ~11 min on 2 AVX2 cores
test: install
	$(BIN)/pytest -q -m "not slow"

# the fault-injection, multi-host and every-fold scenarios (~25 min in all); CI runs both
test-slow: install
	$(BIN)/pytest -q -m slow

test-all: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
