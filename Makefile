# Two entry points for a fresh machine: `make test` and `make demo`. Both build the virtual
# environment from requirements-dev.txt first (CPU torch, exact pins).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo setup clean gpu-check

setup: $(STAMP)

$(STAMP): requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, alone and pinned: anything that pulls a looser "torch" afterwards finds it
	# satisfied and does not reach for a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# The first command on a machine with a GPU (docs/BENCHMARKS.md): the platform's own Python,
# no venv and no network (bitsandbytes and pytest come from .whl/ when missing); ends within
# 8 minutes. Results in $(GPU_CHECK_OUT)/gpu_check.json and gpu_check.md.
GPU_CHECK_OUT ?= gpu-check-out
gpu-check:
	$(PY) scripts/gpu_check.py $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) demo-out .pytest_cache
