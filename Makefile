# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv, then `dvc repro` on the bundled synthetic Cityscapes-format data
#   make test   install into .venv, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow test-soak test-all lint install node docs

$(BIN)/seg: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[orchestration,dev]' -c constraints.txt
	touch $(BIN)/seg

install: $(BIN)/seg

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

# the everyday suite (e2e runs of dvc repro and a Prefect server included): ~15 min on 2 AVX2 cores
test: install
	$(BIN)/pytest -q -m "not slow"

# the scenarios of minutes each CI runs after `make test` (~28 min on 2 AVX2 cores): the docs'
# shell blocks, faults, a killed worker's run resumed on another host, two nodes, a local
# sweep that prunes, the stage deps recorded (every k-fold stage), the GPU node's install
test-slow: install
	$(BIN)/pytest -q -m "slow and not soak" --durations=15

# the longest scenarios, past CI's 45-minute budget (~33 min more): a sweep on a pool of two
# hosts, eight runs on two hosts, a lost slot, four scheduled runs through the promotion gate,
# overlapping scheduled runs, dvc repro -f and dvc exp run, the k-fold stages rerun, a commit
# that changes code, credentials in the API URL. Run them on a change to
# stages/runs.py, flows.py, experiments.py, supervise.py, sweep_flow.py or promotion.py
test-soak: install
	$(BIN)/pytest -q -m soak --durations=15

test-all: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# A GPU node: the core package (and s3fs) into the Python that already has the node's torch
# (PY=python, a conda env's, ...), which it never replaces: pip gets the installed torch's
# version as a constraint, so it picks the torchvision made for that torch (an unpinned
# torchvision would pull in the newest torch). NODE_PIP: more pip options (--dry-run ...).
NODE_EXTRAS ?= s3
node:
	@c=$$(mktemp) && $(PY) -c 'import importlib.metadata as m, sys; \
	  v = {(d.metadata["Name"] or "").lower(): d.version for d in m.distributions()}.get("torch"); \
	  print("torch==" + v) if v else sys.exit(f"error: no torch in {sys.executable}: install the node torch first")' > $$c \
	  && echo "keeping $$(cat $$c) ($(PY))" \
	  && $(PY) -m pip install -e '.[$(NODE_EXTRAS)]' -c $$c $(NODE_PIP); s=$$?; rm -f $$c; exit $$s

# The docs site (mkdocs-material): docs/, built strictly into site/
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
