# Two entry points for a newcomer: `make demo` and `make test`.
# Both create .venv, install torch first (so the project's `torch>=2.4`
# range is already satisfied and pip never pulls a different build), then the
# project. On a GPU machine install your CUDA torch into .venv first, or set
# TORCH_PIP_ARGS; on a CPU-only machine off this image, e.g.
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install install-test

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PIP) install -q -e .

install-test: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PIP) install -q -e ".[test]"

demo: install
	$(VENV)/bin/llmpipe run configs/demo.yaml

test: install-test
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=30
