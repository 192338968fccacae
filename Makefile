# Two entry points for a fresh machine: `make test` and `make demo`. Both build the virtual
# environment from requirements-dev.txt first (CPU torch, exact pins).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo setup clean gpu-check gpu-wheels fresh-check

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

# What a new user installs today: a fresh venv from requirements.txt (newest releases its ranges
# allow), the tiny two-session run with and without HF's `kernels`, status and merge, and the GPU
# check's dry run on the newest transformers/peft/accelerate (scripts/fresh_install.sh; needs
# PyPI; a few minutes). .ci/run runs it after `make test`.
fresh-check: $(STAMP)
	bash scripts/fresh_install.sh

# The first command on a machine with a GPU (docs/BENCHMARKS.md): the platform's own Python,
# no venv and no network (what the image lacks comes from .whl/, filled by `make gpu-wheels`
# beforehand); ends within 8 minutes. Results in $(GPU_CHECK_OUT)/gpu_check.json and .md.
GPU_CHECK_OUT ?= gpu-check-out
gpu-check:
	$(PY) scripts/gpu_check.py $(GPU_CHECK_OUT)

# The wheels of scripts/gpu_wheels.txt for linux x86_64 and the GPU image's CPython (needs
# PyPI; at most 60 MiB; .whl/ is git-ignored: carry it with the working tree).
GPU_PYTHON ?= 3.12
WHEELS ?= .whl
gpu-wheels:
	$(PY) scripts/gpu_wheels.py download --python-version $(GPU_PYTHON) --dest $(WHEELS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache .cache/fresh-install
