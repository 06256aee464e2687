# zeda — every target works on a fresh machine: `make install` builds .venv from pyproject.toml alone.
VENV ?= .venv
PY := $(VENV)/bin/python
ZEDA := $(VENV)/bin/zeda
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast lint format demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e ".[train,bench,lmeval,dev]"
	touch $@

# The test command of the README and of .ci/run.
test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

format: install
	$(VENV)/bin/ruff format src tests benchmarks scripts
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts

# The main job on the bundled model (see README "Quick start"): convert it end to end, then evaluate the result.
demo: install
	$(ZEDA) inspect models/pystdlib-moe
	$(ZEDA) convert models/pystdlib-moe --out runs/demo --recipe tiny-demo --overwrite
	$(ZEDA) eval runs/demo/export --data models/pystdlib-moe/data/heldout.jsonl

bench: install
	$(PY) benchmarks/speed.py --quick

clean:
	rm -rf runs .pytest_cache .ruff_cache
